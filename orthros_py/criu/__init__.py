"""CRIU: request builders, the RPC session over ``criu swrk``, image reading and statistics."""
