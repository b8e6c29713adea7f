"""Response mutations never destroy a real reply, and a mutation that can never be carried is
a configuration error (the rule is written in docs/contract.md)."""

from __future__ import annotations

import pytest
from proxy_kit import mesh

from metaprotocol_sdk import ConfigError
from metaprotocol_sdk.proxy import loads_config

ROUTER = """\
- name: tagged
  route: [{destination: {host: svc.test}}]
  responseMutation: [{key: x-proxy, value: metaprotocol}]
"""


def thrift_mesh(options: str) -> str:
    return mesh(
        [(19001, "v1")],
        router=ROUTER,
        protocol="thrift",
        codec="thrift",
        proxy=f"codecOptions: {{thrift: {options}}}\n",
    )


@pytest.mark.parametrize("transport", ["framed", "unframed"])
def test_forced_headerless_transport_refuses_response_mutation(transport: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(thrift_mesh(f"{{transport: {transport}}}"))
    assert caught.value.field == "spec.routes[0].responseMutation"
    assert "cannot write response mutations" in str(caught.value)


@pytest.mark.parametrize("options", ["{}", "{transport: header}", "{transport: auto}"])
def test_transports_that_may_carry_headers_accept_it(options: str) -> None:
    config = loads_config(thrift_mesh(options))
    assert config.routers["svc.test"].routes[0].response_mutation == {"x-proxy": "metaprotocol"}


def test_active_capabilities_follow_the_options() -> None:
    from metaprotocol_thrift import ThriftCodec

    assert ThriftCodec().active_capabilities.response_mutation
    framed = ThriftCodec(transport="framed").active_capabilities
    assert not framed.mutation and not framed.response_mutation
    assert framed.rewrite_request_id  # only the mutation capabilities depend on the transport
