"""Class 6 of issue #18: every multi-step change is all-or-nothing.

``image rm`` with a damaged layer manifest used to unbind the name and then
fail, leaking the layer's references; re-importing bound to the damaged file.
Damage is generated; after each refused ``rm`` nothing may have changed (index,
manifests, every reference count), a re-import must heal the layer without
counting it twice, and then ``rm`` + ``gc`` must leave a clean store.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from stellarium_core import upkeep
from stellarium_core.distribution import ImageError, ImageStore, Importer
from stellarium_core.volumes import filetree
from tests.hostile.common import HOSTILE, new_host, open_host, sandbox


def _tree(root: Path, tag: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "name").write_text(tag)
    (root / "big").write_bytes(tag.encode() * 40_000)
    return root


def _state(host) -> tuple:
    images = ImageStore.for_host(host)
    files = {p.name: p.read_bytes() for p in images.manifests.iterdir()}
    return images.index(), files, {d: e.refs for d, e in host.store.items()}


def _import(host, src: Path, name: str) -> None:
    Importer(ImageStore.for_host(host), host.chunker, host.hasher).import_path(src, name)


@HOSTILE
@given(where=st.floats(0, 1), how=st.sampled_from(["flip", "truncate", "garbage"]),
       which=st.sampled_from(["layer", "image"]))
def test_rm_with_a_damaged_manifest_changes_nothing_then_reimport_heals(where, how, which):
    with sandbox() as tmp:
        cfg = tmp / "host.toml"
        new_host(cfg)
        a, b = _tree(tmp / "a", "a"), _tree(tmp / "b", "b")
        with open_host(cfg) as host:
            _import(host, a, "a")
            _import(host, b, "b")
            images = ImageStore.for_host(host)
            image = images.resolve("a")
            victim = images.path(images.image("a").layers[0] if which == "layer" else image)
        data = bytearray(victim.read_bytes())
        at = int(where * (len(data) - 1))
        if how == "flip":
            data[at] ^= 0x21
        elif how == "truncate":
            del data[at:]
        else:
            data[at:] = b"\x00{]"
        victim.write_bytes(bytes(data))
        with open_host(cfg) as host:
            before = _state(host)
            try:
                ImageStore.for_host(host).remove("a")
            except ImageError as exc:
                assert which == "layer" and "nothing was removed" in str(exc)
                assert _state(host) == before
                _import(host, a, "a")               # re-import heals the layer file...
                assert _state(host)[2] == before[2]  # ...without counting it twice
                ImageStore.for_host(host).remove("a")
            else:  # an unbound image's own manifest holds no references: it just goes
                assert which == "image" and not victim.exists()
            upkeep.gc(host)
            out = tmp / "out"
            filetree.restore(ImageStore.for_host(host).flatten("b"), host.store, out,
                             host.hasher)
            assert filetree.diff_trees(b, out) == []
        with open_host(cfg) as host:
            rep = upkeep.fsck(host)
            assert rep.ok and [p for p in rep.problems if p.severity != "note"] == []


def test_rm_is_refused_while_another_bound_image_is_unreadable(tmp_path):
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    with open_host(cfg) as host:
        _import(host, _tree(tmp_path / "a", "a"), "a")
        _import(host, _tree(tmp_path / "b", "b"), "b")
        images = ImageStore.for_host(host)
        os.truncate(images.path(images.resolve("b")), 10)
        before = _state(host)
        try:
            images.remove("a")
            raise AssertionError("rm went ahead without knowing what image b uses")
        except ImageError as exc:
            assert "nothing was removed" in str(exc)
        assert _state(host) == before
