"""The stages of a build, one module each: read -> normalize -> [html_to_markdown | caption] -> tokenize ->
embed -> write. `plan.plan_stages` turns a job config into the list; `plan.apply_stages` chains them on Ray
Data."""

from .base import ActorStage, Stage, TaskStage
from .plan import actor_stages, apply_stages, generative_stages, plan_stages

__all__ = ["ActorStage", "Stage", "TaskStage", "actor_stages", "apply_stages", "generative_stages", "plan_stages"]
