"""Layouts of sharded gradients (:mod:`.layout`), the shared engine that centralizes
them (:mod:`.engine`) and the collective helpers both use (:mod:`.collectives`)."""
