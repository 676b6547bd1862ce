"""The CLI imports only the module of the verb it runs: every verb must be mapped to the module that adds it."""

from __future__ import annotations

import argparse

from hybridfs.cli import VERB_HOMES, build_parser, requested_verb


def verbs_of(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_every_verb_has_its_home() -> None:
    every = verbs_of(build_parser())
    assert every == set(VERB_HOMES)
    for verb in every:
        assert verb in verbs_of(build_parser(verb))


def test_requested_verb_skips_global_options() -> None:
    assert requested_verb(["--log-level", "DEBUG", "evict", "x"]) == "evict"
    assert requested_verb(["--log-level=DEBUG", "hydrate"]) == "hydrate"
    assert requested_verb(["--help"]) is None
