"""The broken variants: the protocol with one rule broken, built as ``Rules`` values (protocol.md §6.3).

"Test the tester": a simulation that cannot tell a broken protocol from a correct one proves nothing.
Each entry replaces one field of the protocol's ``RULES`` (``pyquorum.core.rules``); production code
never sees these values. The randomized schedules must catch each safety variant within 1,000
schedules (tests/sim/test_broken_variants.py); ``no_demotion`` breaks a liveness rule, which a
measured scenario catches instead.
"""

from __future__ import annotations

from dataclasses import replace

from pyquorum.core.lease import Timing
from pyquorum.core.rules import RULES, Rules


def _always(*_: object) -> bool:
    return True


def _no_embargo(timing: Timing, promise_s: float) -> float:
    return 0.0


def _this_runs_e(timing: Timing, promise_s: float) -> float:
    return timing.election_timeout_s


def _no_drift_margin(timing: Timing) -> float:
    return timing.election_timeout_s + timing.start_delay_s


def _stop_at_the_deadline(timing: Timing) -> float:
    return timing.lease_kill_s


def _never_stop(timing: Timing) -> float:
    return float("inf")


def _ack_time(sent_at: float, acked_at: float) -> float:
    return acked_at


VARIANTS: dict[str, Rules] = {
    # grants a vote to every candidate of a term (§3.4)
    "double_vote": replace(RULES, may_vote=_always),
    # grants (pre-)votes while it hears a live master (§3.3)
    "no_prevote_stickiness": replace(RULES, stickiness_e=0.0),
    # votes and campaigns right after a restart (§3.6)
    "no_restart_embargo": replace(RULES, embargo_s=_no_embargo),
    # restart embargo of this run's E only, not the previous run's E + D (§3.6)
    "embargo_ignores_promise": replace(RULES, embargo_s=_this_runs_e),
    # L_kill = E + D, ignoring clock-rate drift (§4.2)
    "no_drift_margin": replace(RULES, lease_kill_s=_no_drift_margin),
    # the master starts stopping its script only at the kill deadline (§4.3)
    "late_stepdown": replace(RULES, stop_begin_s=_stop_at_the_deadline),
    # the master never steps down without acknowledgements (§4.3)
    "no_quorum_check": replace(RULES, stop_begin_s=_never_stop),
    # the lease counted from the acknowledgement's arrival, not the round's send (§4.2)
    "lease_from_ack_time": replace(RULES, lease_start=_ack_time),
    # resigns before the script is reaped (§3.7)
    "resign_before_stop": replace(RULES, resign_after_reap=False),
    # resign() on any role, dropping the stickiness to the master it follows (§3.7)
    "resign_any_role": replace(RULES, may_resign=_always),
    # a node that lost its state votes at once, as if brand new (§3.9)
    "amnesia_votes": replace(RULES, recovers_lost_state=False),
    # a master that lost its lease proposes first again next time (§3.3)
    "no_demotion": replace(RULES, demotion_e=0.0),
    # the master's report of who is live is ignored: followers, who no longer hear each other, all
    # think they are the lowest live node (§3.2)
    "no_live_report": replace(RULES, report_e=0.0),
    # a quiet follower never answers a plain heartbeat: a node with no master hears only the master (§3.2)
    "no_plain_answer": replace(RULES, answer_plain=False),
    # a node with no master keeps alive the first two proposers before it even when they are dead:
    # behind two dead ones nobody hears anybody, and every live node thinks it proposes first (§3.2)
    "keepalive_stops_at_the_dead": replace(RULES, keepalive_past_the_dead=False),
    # a node's first heartbeat duty goes only to its keep-alive targets: a pair of followers that never
    # spoke in this life shakes hands on the first request of a handover, which is refused (§3.2)
    "no_first_greeting": replace(RULES, greet_every_peer=False),
    # a witness campaigns like any member, and may become master (§3.11)
    "witness_campaigns": replace(RULES, witness_abstains=False),
    # the master grants a pre-emption to a preferred node however briefly connected (§3.10)
    "preempt_while_flapping": replace(RULES, preempt_needs_connection=False),
}


def rules_for(names: frozenset[str]) -> Rules:
    """``RULES`` with every named variant's broken fields (they break disjoint fields)."""
    rules = RULES
    for name in sorted(names):
        variant = VARIANTS[name]
        changed = {
            f: getattr(variant, f)
            for f in Rules.__dataclass_fields__
            if getattr(variant, f) != getattr(RULES, f)
        }
        rules = replace(rules, **changed)
    return rules
