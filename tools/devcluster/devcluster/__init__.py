"""Development tooling for workorder-operator: a real local control plane (`devcluster.envtest`).

Not shipped with the product: tests, benchmarks and the Makefile use it; the operator and the
SDK never import it.
"""
