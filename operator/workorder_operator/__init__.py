"""workorder-operator: a Kubernetes-native work queue."""

__version__ = "0.1.0"
