"""moeserve gateway: the OpenAI-compatible HTTP service in front of the engines.

It never imports torch, the engine or the kernels; it shares only the generated gRPC
stubs with the engine.
"""
