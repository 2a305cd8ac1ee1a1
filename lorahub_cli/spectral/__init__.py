"""What an adapter's weights alone say about it: its singular directions, the weight card that stores
them, retrieval scores from them (Arrow, SpectR) and Arrow's per-token routing. See docs/weights.md."""
