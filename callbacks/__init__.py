"""Lightning callbacks of sdzero-pl. None of them changes the trained weights unless that is its job
(TeacherSync changes the teacher; it never touches the student)."""

from callbacks.teacher_sync import TeacherSync

__all__ = ["TeacherSync"]
