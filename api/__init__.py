"""The HTTP edge: routes, their auth, decoding and answers, and the OpenAPI document (see README, Layout)."""
