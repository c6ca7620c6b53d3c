"""pbt-operator: Population Based Training and PB2, on Kubernetes or on one machine."""

__version__ = "0.1.0"
