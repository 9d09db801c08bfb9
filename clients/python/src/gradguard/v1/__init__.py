"""Generated gRPC stubs of gradguard.v1 (tools/generate_stubs.py)."""
