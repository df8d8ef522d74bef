"""The study as one resumable job: spec (the grid), plan (its steps), run (the job and the
service), report (results and verdicts), cli (`python -m jobs.study plan|run|resume|report SPEC`)."""
from jobs.study.plan import StudyPlan, StudyResources, plan_study
from jobs.study.run import Studies, StudyStepError
from jobs.study.spec import KIND, StudySpec, StudySpecError

__all__ = ["KIND", "Studies", "StudyPlan", "StudyResources", "StudySpec", "StudySpecError",
           "StudyStepError", "plan_study"]
