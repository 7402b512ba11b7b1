"""statelab's benchmarks (``sudo make bench``): see bench/__main__.py."""
