"""Methods built on the core: mean-field variational layers, coresets, the linearised predictive, the Laplace
evidence, and predictive uncertainty."""
