"""Reports never add a whole-node meter (psys) to the parts it overlaps."""

from llem.report.frames import reconciliation

UJ_PER_KWH = 3_600_000_000_000


def row(node, component, measured_kwh, attributed_kwh, remainder_kwh, idle_unallocated_kwh=0.0):
    return (
        node,
        component,
        "measured",
        int(measured_kwh * UJ_PER_KWH),
        int(attributed_kwh * UJ_PER_KWH),
        int(remainder_kwh * UJ_PER_KWH),
        10,
        0,
        3600 * 10**9,
        1,
        1,
        int(idle_unallocated_kwh * UJ_PER_KWH),
        0,
    )


def test_the_node_meter_is_shown_but_not_added():
    rows = [
        row("n1", "cpu", 2.0, 1.5, 0.5, 0.25),
        row("n1", "gpu", 4.0, 4.0, 0.0),
        row("n1", "platform", 1.0, 0.5, 0.5, 0.5),
        row("n1", "psys", 7.0, 0.0, 7.0),
    ]
    rec = reconciliation(rows, ["n1"], 6.0)
    assert rec["measured_kwh"] == 7.0  # the meter's energy, once: parts + platform
    assert rec["attributed_kwh"] == 6.0
    assert rec["remainder_kwh"] == 1.0
    assert rec["idle_unallocated_kwh"] == 0.75 and rec["unallocated_kwh"] == 0.0
    components = set(rec["by_component"]["component"])
    assert components == {"cpu", "gpu", "platform", "psys"}
