"""fem-hpc: the client side of a Federated Execution Manager for HPC centres and laptops."""

__version__ = "0.1.0"
