"""CLIP adapters: trained methods, training-free heads and the frozen backbone."""
