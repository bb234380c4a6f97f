"""A real S3 server and a small real model, for the `demo` command and the tests."""
