"""Kubernetes side: CRDs, pure builders, the reconcile plan, and thin kopf handlers."""
