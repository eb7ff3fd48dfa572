"""The built-in world: shapes and captions, its tiny VAE, and the judge that scores samples of it."""
