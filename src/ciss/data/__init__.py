"""Datasets: class lists, dataset folders, synthetic scenes, CiSS scenarios, transforms."""
