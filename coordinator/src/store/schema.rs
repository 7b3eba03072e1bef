//! The store's schema: migrations applied in order, `PRAGMA user_version` counting how many ran,
//! and `PRAGMA application_id` marking the file as liandan's.

/// `PRAGMA application_id` of a liandan store ("LDAN").
pub const APPLICATION_ID: i64 = 0x4C44_414E;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    spec_toml   TEXT NOT NULL,
    state       TEXT NOT NULL,          -- queued | running | succeeded | failed | cancelled
    error       TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE phases (
    job_id               INTEGER NOT NULL REFERENCES jobs(id),
    idx                  INTEGER NOT NULL,
    name                 TEXT NOT NULL,
    state                TEXT NOT NULL,  -- queued | running | succeeded | failed | cancelled
    plan_json            TEXT NOT NULL,
    total_steps          INTEGER NOT NULL,
    step                 INTEGER NOT NULL DEFAULT 0,
    generation           INTEGER NOT NULL DEFAULT 0,
    world                INTEGER NOT NULL DEFAULT 0,
    min_workers          INTEGER NOT NULL,
    max_workers          INTEGER NOT NULL,
    checkpoint_dir       TEXT NOT NULL,
    input_checkpoint     TEXT NOT NULL DEFAULT '',
    last_checkpoint      TEXT NOT NULL DEFAULT '',
    last_checkpoint_step INTEGER NOT NULL DEFAULT 0,
    error                TEXT NOT NULL DEFAULT '',
    started_ms           INTEGER NOT NULL DEFAULT 0,
    finished_ms          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE workers (
    id                INTEGER PRIMARY KEY,
    hostname          TEXT NOT NULL,
    device            TEXT NOT NULL,
    ring_address      TEXT NOT NULL,
    state             TEXT NOT NULL,     -- idle | busy | draining | drained | dead
    lease_until_ms    INTEGER NOT NULL,
    last_heartbeat_ms INTEGER NOT NULL,
    job_id            INTEGER NOT NULL DEFAULT 0,
    phase_idx         INTEGER NOT NULL DEFAULT 0,
    rank              INTEGER NOT NULL DEFAULT 0,
    generation        INTEGER NOT NULL DEFAULT 0,
    registered_ms     INTEGER NOT NULL
);
CREATE TABLE metrics (
    job_id     INTEGER NOT NULL,
    phase_idx  INTEGER NOT NULL,
    step       INTEGER NOT NULL,
    loss       REAL NOT NULL,
    lr         REAL NOT NULL,
    grad_norm  REAL NOT NULL,
    tokens     INTEGER NOT NULL,
    step_ms    INTEGER NOT NULL,
    world      INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (job_id, phase_idx, step)
);
CREATE TABLE checkpoints (
    job_id       INTEGER NOT NULL,
    phase_idx    INTEGER NOT NULL,
    step         INTEGER NOT NULL,
    path         TEXT NOT NULL,
    generation   INTEGER NOT NULL,
    committed_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, phase_idx, step)
);
CREATE TABLE datasets (
    path            TEXT PRIMARY KEY,
    vocab_size      INTEGER NOT NULL,
    train_tokens    INTEGER NOT NULL,
    tokenizer_sha256 TEXT NOT NULL,
    registered_ms   INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE metrics ADD COLUMN values_json TEXT NOT NULL DEFAULT '{}';
"#,
    r#"
CREATE TABLE comparisons (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    prompt      TEXT NOT NULL,
    task        TEXT NOT NULL DEFAULT '',
    answer_a    TEXT NOT NULL,
    answer_b    TEXT NOT NULL,
    checkpoint  TEXT NOT NULL,
    choice      TEXT NOT NULL DEFAULT '',
    labeler     TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL,
    answered_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX comparisons_open ON comparisons (job_id, choice);
"#,
    r#"
ALTER TABLE workers ADD COLUMN instance TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN memory_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE phases ADD COLUMN ring_secret TEXT NOT NULL DEFAULT '';
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE INDEX workers_state ON workers (state);
CREATE INDEX workers_instance ON workers (instance);
CREATE INDEX workers_group ON workers (job_id, phase_idx, generation);
CREATE INDEX phases_state ON phases (state);
CREATE INDEX jobs_state ON jobs (state);
"#,
    r#"
CREATE TABLE rollout_samples (
    job_id         INTEGER NOT NULL,
    phase_idx      INTEGER NOT NULL,
    step           INTEGER NOT NULL,
    idx            INTEGER NOT NULL,
    prompt         TEXT NOT NULL,
    answer         TEXT NOT NULL,
    reward         REAL,
    rm_score       REAL,
    verified       INTEGER NOT NULL,
    verifier_score REAL,
    verifier_pass  INTEGER NOT NULL,
    kl             REAL,
    PRIMARY KEY (job_id, phase_idx, step, idx)
);
"#,
];
