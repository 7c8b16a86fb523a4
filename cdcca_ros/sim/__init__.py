"""The drifting synthetic world: scenes, questions, drifting domains, scoring, model recipe.

Pure numpy + OpenCV; importing it loads neither torch nor rclpy.
"""
from cdcca_ros.sim.domains import (
                                   DRIFTED,
                                   SOURCE,
                                   Domain,
                                   DomainSchedule,
                                   domain_names,
                                   get_domain,
                                   register_domain,
)
from cdcca_ros.sim.questions import QTYPES, Question, answer_space, vocabulary
from cdcca_ros.sim.scoring import mc_accuracy, normalize_answer, vqa_accuracy
from cdcca_ros.sim.shifts import register_shift, shift_names
from cdcca_ros.sim.world import Frame, Sample, SyntheticStream, World

__all__ = ['DRIFTED', 'SOURCE', 'Domain', 'DomainSchedule', 'domain_names', 'get_domain',
           'register_domain', 'QTYPES', 'Question', 'answer_space', 'vocabulary', 'mc_accuracy',
           'normalize_answer', 'vqa_accuracy', 'register_shift', 'shift_names', 'Frame', 'Sample',
           'SyntheticStream', 'World']
