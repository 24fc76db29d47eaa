from training.quality import QUESTIONS, Question, is_right


def test_a_reply_is_right_when_it_names_an_answer_as_a_whole_word():
    q = Question("How many legs does a spider have?", ("8", "eight"))
    assert is_right("A spider has eight legs.", q)
    assert is_right("8", q)
    assert not is_right("A spider has 18 legs.", q)
    assert not is_right("Weighty matters.", q)


def test_the_shipped_set_has_distinct_questions_each_with_an_answer():
    assert len(QUESTIONS) >= 10
    assert len({q.question for q in QUESTIONS}) == len(QUESTIONS)
    assert all(q.answers and all(a.strip() for a in q.answers) for q in QUESTIONS)
