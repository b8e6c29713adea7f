"""Routes, clusters and endpoints from a control plane over ADS (Envoy's xDS, v3).

Imported only when ``ProxyConfig.spec.xds`` is set: it needs ``grpcio`` and ``xds-protos``
(``pip install 'metaprotocol-sdk[xds]'``), which an engine without a control plane never loads.
"""
