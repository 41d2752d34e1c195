"""GPU kernels (Triton) for moeserve, each beside the plain-torch reference it is tested
against. Imports nothing of the engine."""
