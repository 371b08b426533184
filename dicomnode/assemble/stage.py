"""Series stability and job creation.

A series is complete when nothing arrived for ``assembly.series_stable_seconds``. For every rule
and patient (once nothing of the patient is still arriving), the best reference series of each
study is chosen by the rule's preferences (``SeriesSelector``) and paired with the best complete
moving series of the same study or of a study within ``assembly.pair_window_hours``. What each rule
decided about each series (chosen for a job, skipped and why, waiting for what) is kept in
``series_decisions`` and audited when it changes (``decisions.py``). A job is keyed by
(rule, reference series, moving series, their generations), so re-running never duplicates it;
a series that received new instances after completion has a new generation and gets a new job.

A series fetched from a PACS (``prior_retrieves``) is left alone while its retrieve is pending or
running, and is complete as soon as its retrieve is done and nothing arrived after it: every
sub-operation has been answered, so there is nothing to wait for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.assemble.decisions import SeriesDecisions
from dicomnode.assemble.selection import Choice, SeriesSelector, pairable, series_geometry
from dicomnode.config import RuleConfig, Settings
from dicomnode.db import Job, PriorRetrieve, Series, record, utcnow
from dicomnode.db.leases import lock_patients

log = logging.getLogger("dicomnode.assemble")
STAGE = "assemble"
RETRIEVE_ACTIVE = ("pending", "running")


class AssembleStage:
    """Marks stable series complete and creates one job per complete (reference, moving) pair."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.clock = clock

    def run_once(self) -> int:
        """One pass: returns the number of series completed plus jobs created."""
        return self.complete_stable_series() + self.create_jobs()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the stage alive; the error is logged with its traceback
                log.exception("assemble pass failed")
            stop.wait(self.settings.assembly.poll_seconds)

    def complete_stable_series(self) -> int:
        cutoff = self.clock() - timedelta(seconds=self.settings.assembly.series_stable_seconds)
        stable_why = f"no instance for {self.settings.assembly.series_stable_seconds:g} s"
        done = 0
        with self.sessionmaker() as s:
            stable = s.scalars(
                select(Series).where(Series.state == "receiving", Series.last_received_at <= cutoff)
            ).all()
            candidates = [(series, cutoff, stable_why) for series in stable]
            retrieved = s.execute(
                select(Series, PriorRetrieve.id, PriorRetrieve.source, PriorRetrieve.finished_at)
                .join(PriorRetrieve, PriorRetrieve.series_instance_uid == Series.series_instance_uid)
                .where(
                    Series.state == "receiving",
                    PriorRetrieve.state == "done",
                    PriorRetrieve.finished_at >= Series.last_received_at,
                )
            ).all()
            seen = {series.id for series in stable}
            for series, retrieve_id, source, finished in retrieved:
                if series.id not in seen:
                    seen.add(series.id)
                    why = f"retrieve {retrieve_id} from {source} done, every sub-operation answered"
                    candidates.append((series, finished, why))
            for series, not_after, why in candidates:
                # Conditional update: a receiver that just added an instance wins.
                res = s.execute(
                    update(Series)
                    .where(
                        Series.id == series.id,
                        Series.state == "receiving",
                        Series.last_received_at <= not_after,
                        Series.generation == series.generation,
                    )
                    .values(state="complete", completed_at=self.clock())
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    record(
                        s,
                        STAGE,
                        "series",
                        series.series_instance_uid,
                        "receiving",
                        "complete",
                        f"{why}; {series.n_instances} instances, generation {series.generation}",
                    )
                    done += 1
            s.commit()
        if done:
            log.info("%d series complete", done)
        return done

    def _plan_rule(self, s: Session, rule: RuleConfig) -> _RulePlan:
        """Read what the rule would decide for every settled patient (writes nothing)."""
        complete = s.scalars(
            select(Series).where(
                Series.state == "complete", Series.modality.in_({rule.reference, rule.moving})
            )
        ).all()
        refs = [x for x in complete if x.modality == rule.reference]
        if not refs:
            return _RulePlan(rule, None)
        patients = {r.patient_key for r in refs}
        # Wait until nothing of the patient is still arriving: the choice of series needs them all.
        busy = set(
            s.scalars(
                select(Series.patient_key).where(
                    Series.state == "receiving", Series.patient_key.in_(patients)
                )
            ).all()
        )
        # A series still being retrieved from a PACS is not chosen until its retrieve is done.
        retrieving = set(
            s.scalars(
                select(PriorRetrieve.series_instance_uid).where(
                    PriorRetrieve.state.in_(RETRIEVE_ACTIVE), PriorRetrieve.patient_key.in_(patients)
                )
            ).all()
        )
        settled = [
            x
            for x in complete
            if x.patient_key in patients - busy and x.series_instance_uid not in retrieving
        ]
        refs = [x for x in settled if x.modality == rule.reference]
        movs = [x for x in settled if x.modality == rule.moving]
        geometry = series_geometry(s, [x.series_instance_uid for x in settled])
        selector = SeriesSelector(rule, geometry)
        plan = _RulePlan(rule, SeriesDecisions(rule, selector), patients - busy)
        decisions = plan.decisions
        assert decisions is not None
        window = self.settings.assembly.pair_window_hours
        for patient in sorted(patients - busy):
            p_refs = [r for r in refs if r.patient_key == patient]
            p_movs = [m for m in movs if m.patient_key == patient]
            for study_uid in sorted({r.study_instance_uid for r in p_refs}):
                candidates = [r for r in p_refs if r.study_instance_uid == study_uid]
                ref_choice = selector.choose(candidates, "reference")
                decisions.not_chosen(candidates, ref_choice.series)
                if ref_choice.series is None:
                    continue
                ref = ref_choice.series
                paired = [m for m in p_movs if pairable(rule, window, ref, m)]
                mov_choice = selector.choose(paired, "moving", near=ref)
                decisions.not_chosen(paired, mov_choice.series)
                if mov_choice.series is None:
                    decisions.waiting(ref, f"no eligible {rule.moving} series to pair with: {mov_choice.why}")
                    continue
                plan.pairs.append((ref, mov_choice.series, ref_choice, mov_choice))
            for m in p_movs:
                decisions.waiting(
                    m,
                    f"no eligible {rule.reference} series of the patient in its study or within "
                    f"{self.settings.assembly.pair_window_hours:g} h",
                )
        return plan

    def _write_plan(self, s: Session, plan: _RulePlan, decided: set[str]) -> int:
        """Create the plan's jobs and write its decisions, for the patients this process holds."""
        if plan.decisions is None:
            return 0
        created = 0
        for ref, mov, ref_choice, mov_choice in plan.pairs:
            if ref.patient_key not in decided:
                continue
            job, is_new = self._create_job(s, plan.rule, ref, mov, ref_choice, mov_choice)
            created += is_new
            plan.decisions.chosen(ref, ref_choice.why, job.id)
            plan.decisions.chosen(mov, mov_choice.why, job.id)
        plan.decisions.keep_patients(decided)
        plan.decisions.save(s, self.clock())
        return created

    def _create_job(
        self, s: Session, rule: RuleConfig, ref: Series, mov: Series, ref_choice: Choice, mov_choice: Choice
    ) -> tuple[Job, bool]:
        """The job of this pair at the series' generations: (the existing one, False) or (new, True)."""
        key = and_(
            Job.rule_name == rule.name,
            Job.reference_series_uid == ref.series_instance_uid,
            Job.moving_series_uid == mov.series_instance_uid,
        )
        existing = s.scalars(select(Job).where(key).order_by(Job.id)).all()
        gens = (ref.generation, mov.generation)
        same = [j for j in existing if (j.reference_generation, j.moving_generation) == gens]
        if same:
            return same[0], False
        reason = f"rule {rule.name}: {rule.reference} series complete with {rule.moving} series"
        if existing:
            prev = existing[-1]
            changed = []
            if prev.reference_generation != ref.generation:
                changed.append(f"{rule.reference} series generation {ref.generation}")
            if prev.moving_generation != mov.generation:
                changed.append(f"{rule.moving} series generation {mov.generation}")
            reason = f"rule {rule.name}: new instances after job {prev.id} ({prev.state}); " + ", ".join(
                changed
            )
        reason += f". Reference: {ref_choice.why}. Moving: {mov_choice.why}"
        job = Job(
            rule_name=rule.name,
            patient_key=ref.patient_key,
            reference_series_uid=ref.series_instance_uid,
            moving_series_uid=mov.series_instance_uid,
            reference_generation=ref.generation,
            moving_generation=mov.generation,
            state="pending",
        )
        try:
            with s.begin_nested():
                s.add(job)
                s.flush()
        except IntegrityError:  # another assembler created it first: idempotent
            other = s.scalars(
                select(Job).where(key, Job.reference_generation == gens[0], Job.moving_generation == gens[1])
            ).one()
            return other, False
        record(s, STAGE, "job", job.id, None, "pending", reason)
        log.info("job %d created (rule %s)", job.id, rule.name)
        return job, True

    def create_jobs(self) -> int:
        """Plan every rule, then create jobs and write decisions for the patients this process holds.

        Only one assembler decides a patient at a time (``lock_patients``): the plan is read without
        locks; the writes happen under the patients' locks, where the lookup of an existing job sees
        every job another assembler committed. Patients another assembler holds are left to it this
        pass. The unique key of a job stays the last guard.
        """
        with self.sessionmaker() as s:
            plans = [self._plan_rule(s, rule) for rule in self.settings.rules]
            s.commit()  # ends the reads (nothing written, nothing expired); the writes begin with the locks
            patients = set().union(*(p.patients for p in plans))
            if not patients:
                return 0
            decided = lock_patients(s, patients)
            if decided != patients:
                log.debug("%d patient(s) being decided by another assembler", len(patients - decided))
            created = sum(self._write_plan(s, plan, decided) for plan in plans)
            s.commit()
        return created


@dataclass
class _RulePlan:
    """What one rule would do this pass: the pairs that need a job, and its series decisions."""

    rule: RuleConfig
    decisions: SeriesDecisions | None
    patients: set[str] = field(default_factory=set)  # settled patients the plan covers
    pairs: list[tuple[Series, Series, Choice, Choice]] = field(default_factory=list)
