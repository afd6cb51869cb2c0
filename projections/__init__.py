"""Read models folded from the event feed, their runtime and rebuilds."""
