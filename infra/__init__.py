"""Storage, Ray and cluster plumbing."""
