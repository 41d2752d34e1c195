"""Generated gRPC stubs of protos/ (scripts/gen_protos.sh); never edited by hand."""
