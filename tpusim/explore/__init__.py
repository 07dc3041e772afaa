"""Many simulations at once: grids of configurations (sweep) and the search for the best plan."""
