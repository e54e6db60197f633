"""Web tokens as configured: roles, and the projects a token may be limited to (pipeline/web/auth.py)."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, Forbidden
from pipeline.settings import Settings
from pipeline.web.auth import Principal, Tokens


def tokens(setting: str) -> Tokens:
    return Tokens.from_settings(Settings.from_env({"PIPELINE_WEB_TOKENS": setting}))


def test_a_token_may_be_limited_to_projects_and_one_without_a_limit_reaches_every_project():
    found = tokens("ada:operator:operator-token-0123456789,lab:operator:lab-token-0123456789:lab-a+lab-b")
    assert found.lookup("operator-token-0123456789") == Principal("ada", "operator")
    lab = found.lookup("lab-token-0123456789")
    assert lab == Principal("lab", "operator", frozenset({"lab-a", "lab-b"}))
    assert lab.may_see("lab-b") and not lab.may_see("default")
    assert Principal("ada", "operator").may_see("anything")


@pytest.mark.parametrize(("setting", "why"), [
    ("lab:operator:lab-token-0123456789:", "not name:role:token"),
    ("lab:operator:lab-token-0123456789:lab a", "not a list of project names"),
    ("lab:operator:lab-token-0123456789:lab-a++lab-b", "not a list of project names"),
    ("lab:boss:lab-token-0123456789", "role 'boss'"),
    ("lab:operator:short", "shorter than 16"),
])
def test_a_badly_written_token_entry_is_refused_saying_what_is_wrong(setting, why):
    with pytest.raises(ConfigError, match=why):
        tokens(setting)


def test_a_limited_token_creates_jobs_in_its_projects_only():
    one = Principal("lab", "operator", frozenset({"lab-a"}))
    assert one.project_for_new_job(None) == "lab-a" and one.project_for_new_job("lab-a") == "lab-a"
    with pytest.raises(Forbidden, match="may not create jobs in project 'lab-b'"):
        one.project_for_new_job("lab-b")
    two = Principal("lab", "operator", frozenset({"lab-a", "lab-b"}))
    with pytest.raises(Forbidden, match="name one for the job"):
        two.project_for_new_job(None)
    assert Principal("ada", "operator").project_for_new_job(None) is None  # the default project


def test_a_login_cookie_carries_no_projects_they_come_from_the_token_as_configured_now():
    limited = tokens("lab:operator:lab-token-0123456789:lab-a")
    cookie = limited.session_cookie(limited.lookup("lab-token-0123456789"))
    assert limited.from_cookie(cookie).projects == frozenset({"lab-a"})
