"""The numerics: objectives, the tiled LM head, sequence log-probs, the pair forward, the start-up checks of
the fast paths, and metrics. Pure computation on tensors and models; nothing here reads files or parses flags."""
