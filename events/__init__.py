"""Events: the catalogue, the envelope, the codec and schema versions. No I/O."""
