"""The data feed of Algorithm 1: the built-in world, image folders, aspect-ratio buckets, the cache."""
