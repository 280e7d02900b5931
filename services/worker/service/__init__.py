"""The worker's gRPC side: servicer, slots, scheduler registration, Triton client, server.

Nothing here assumes the embedded Triton: the same code drives a GPU Triton.
"""
