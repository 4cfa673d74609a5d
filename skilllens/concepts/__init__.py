"""Concept vectors: FFN value vectors whose vocabulary projection spells out one concept.

Find them (:class:`ConceptSearch`), validate them causally (:class:`BehaviourSuite`,
:func:`screen_candidates`), ablate them reversibly (:class:`ConceptAblation`), unlearn with
:class:`Needle` or fine-tuning baselines (:class:`FineTuneUnlearner`), and compare intrinsic and
behavioural metrics. See ``shared/METHODS.md`` section 3.
"""
from skilllens.concepts.ablation import (METHODS as ABLATION_METHODS, ColumnEdit, ConceptAblation,
                                         value_vector)
from skilllens.concepts.data import Concept, load_concepts
from skilllens.concepts.generation import (answer_logprob, generate, generate_answers,
                                           greedy_generate, qa_prompts)
from skilllens.concepts.metrics import IntrinsicScores, TextScores, intrinsic_scores, text_scores
from skilllens.concepts.needle import Needle
from skilllens.concepts.search import Candidate, ConceptSearch, token_weights
from skilllens.concepts.select import SetSelector, ablated, random_control
from skilllens.concepts.split import Split, split_indices
from skilllens.concepts.teacher import TeacherForced
from skilllens.concepts.unlearn import FineTuneUnlearner
from skilllens.concepts.metrics import BehaviourScores
from skilllens.concepts.validate import (AnswerCache, BehaviourSuite, probe_prompts,
                                         screen_candidates)
from skilllens.concepts.vocab import VocabProjection, project_values, top_tokens

__all__ = ["ABLATION_METHODS", "ColumnEdit", "ConceptAblation", "value_vector", "Concept",
           "load_concepts", "answer_logprob", "generate", "generate_answers", "greedy_generate",
           "qa_prompts", "SetSelector", "ablated", "random_control", "Split", "split_indices",
           "TeacherForced",
           "IntrinsicScores", "TextScores", "intrinsic_scores", "text_scores", "Needle",
           "Candidate", "ConceptSearch", "token_weights", "FineTuneUnlearner", "AnswerCache",
           "BehaviourScores", "BehaviourSuite", "probe_prompts", "screen_candidates",
           "VocabProjection", "project_values", "top_tokens"]
