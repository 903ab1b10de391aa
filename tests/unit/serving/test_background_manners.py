"""Background work in a serving process (a reload, a live re-tune) hands the GIL back often and keeps BLAS
and OpenMP to one thread; overlapping users share the setting, and the last one out restores it."""

from __future__ import annotations

import sys

import faiss

from towerann.serving.monitor import background_manners


def test_overlapping_background_work_keeps_its_manners_until_the_last_one_ends() -> None:
    before_switch, before_omp = sys.getswitchinterval(), faiss.omp_get_max_threads()
    reload, retune = background_manners(), background_manners()
    reload.__enter__()
    assert sys.getswitchinterval() == 0.0005 and faiss.omp_get_max_threads() == 1
    retune.__enter__()
    reload.__exit__(None, None, None)  # the reload ends while the re-tune runs on
    assert sys.getswitchinterval() == 0.0005 and faiss.omp_get_max_threads() == 1
    retune.__exit__(None, None, None)
    assert sys.getswitchinterval() == before_switch and faiss.omp_get_max_threads() == before_omp
