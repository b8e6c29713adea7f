"""The documented example filter does in the engine what the harness says it does: a real
KV client and upstream on 127.0.0.1, the filter configured by ``module:Class``."""

from __future__ import annotations

from proxy_kit import Client, Upstream, address, engine_for, error_type, mesh, run

from metaprotocol_sdk.examples.audit_filter import AuditFilter

FILTERS = (
    "filters: [{name: 'metaprotocol_sdk.examples.audit_filter:AuditFilter', "
    "config: {auditor: mesh-audit, required: [method, x-user]}}]"
)


def test_example_filter_marks_refuses_and_counts_through_the_engine() -> None:
    async def main() -> None:
        up = await Upstream("a").start()
        text = mesh([(up.port, "v1")]).replace(
            "bind: '127.0.0.1:0'}]", f"bind: '127.0.0.1:0', {FILTERS}}}]", 1
        )
        async with engine_for(text) as engine:
            c = await Client.connect(address(engine))
            reply = await c.call("get", {"x-user": "ann"})
            assert reply.attributes["req-x-audited-by"] == "mesh-audit"  # the upstream saw it
            refused = await c.call("get")  # no x-user
            assert error_type(refused) == "BadRequest" and len(up.received) == 1
            (listener,) = engine.listeners.values()
            (audit,) = listener.table.routes[0].response_filters
            assert isinstance(audit, AuditFilter)
            assert audit.answers == {"Ok": 1, "BadRequest": 1}
            assert engine.config_dump()["listeners"][0]["routes"][0]["chain"] == ["audit"]
            c.close()
        await up.close()

    run(main())
