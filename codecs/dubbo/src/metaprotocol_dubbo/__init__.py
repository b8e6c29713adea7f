"""Dubbo reference codec (Hessian 2.0 serialization) for the MetaProtocol codec SDK."""
