"""Optional adapters to the frameworks users already run (`lightning`: a PyTorch Lightning
strategy). Nothing in Loom imports them; each needs its framework installed."""
