//! Whole-call recordings: `relay-agent record` writes one call (its webhooks, the media upgrade,
//! every frame each way with its timing) as JSON lines while it happens, and the player replays
//! the file against a bot and reports where the bot's answers differ from the recorded ones.

use std::path::Path;
use std::time::Duration;

use relay_agent::Agent;
use relay_record::play::{PlayOptions, Recording, play};
use relay_record::{Entry, FrameData, Side};
use relay_testkit::acs;
use relay_testkit::client::{post_json, send_collect};
use relay_testkit::procs::Proc;
use relay_testkit::{Stack, eventually};

const DEADLINE: Duration = Duration::from_secs(20);
const CALL: &str = "8d1e5a70-3b2c-4f19-a6d4-0c7e9b215f36";
const OTHER_CALL: &str = "11111111-2222-4333-8444-555555555555";
const FRAMES: u64 = 25;

/// Drives one simulated ACS call through the edge ([`acs::simulated_call`]), after a callback
/// of another call, which the recording must leave out.
async fn simulated_call(stack: &Stack) {
    let public = stack.public();
    let other = acs::callback_event("CallConnected", "conn-9", OTHER_CALL);
    assert_eq!(send_collect(public, post_json(public, "/api/callbacks/conn-9", &other)).await.unwrap().status(), 200);
    let call = acs::simulated_call(public, CALL, FRAMES).await.unwrap();
    assert!(call.webhooks.iter().all(|(_, status)| *status == 200), "{:?}", call.webhooks);
    assert!(call.media.intact(), "{:?}", call.media);
}

/// An edge, and an agent with inspection on (and `tweak`'s settings) connected to it.
async fn stack_with_inspecting_agent(tweak: impl FnOnce(&mut relay_agent::config::InspectSettings)) -> (Stack, Agent) {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let state = stack.pair_agent("agent-1").await.unwrap();
    let mut settings = stack.agent_settings(&state).unwrap();
    settings.inspect.enabled = true;
    tweak(&mut settings.inspect);
    let agent = Agent::start(settings).await.unwrap();
    stack.wait_connected(1).await.unwrap();
    (stack, agent)
}

/// `relay-agent record --out FILE` (the shipped command line) recording the next call, once
/// the agent counts it running.
async fn record_next_call(agent: &Agent, file: &Path) -> Proc {
    let admin = agent.admin_addr().unwrap().to_string();
    let args = ["record", "--out", file.to_str().unwrap(), "--admin-listen", &admin].map(Into::into);
    let recorder = Proc::spawn("record", &[], Path::new(env!("CARGO_BIN_EXE_e2e-agent")), &args).unwrap();
    assert!(recorder.wait_line("waiting for the next call", DEADLINE).await.is_some(), "{}", recorder.log());
    let running = || async { agent.metrics_text().contains("relay_agent_recordings 1") };
    assert!(eventually(DEADLINE, running).await, "the recording is running");
    recorder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_call_replays_against_the_bot_with_the_same_answers() {
    let (stack, agent) = stack_with_inspecting_agent(|_| {}).await;
    // Record the next call that arrives, with the shipped command line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("call.jsonl");
    let mut recorder = record_next_call(&agent, &file).await;

    simulated_call(&stack).await;
    let status = recorder.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "{}", recorder.log());
    assert!(recorder.log().contains(&format!("recorded call {CALL}")), "{}", recorder.log());
    assert!(recorder.log().contains("ended: call disconnected"), "{}", recorder.log());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600,
            "it holds the call's content"
        );
    }

    let recording = Recording::from_path(&file).unwrap();
    assert_eq!((recording.meta.call.as_str(), recording.meta.agent.as_str()), (CALL, "agent-1"));
    let paths: Vec<&str> = recording.webhooks().map(|w| w.path.as_str()).collect();
    let callbacks = "/api/callbacks/conn-8d1e5a70";
    assert_eq!(paths, ["/api/incomingCall", callbacks, callbacks], "not the other call's");
    assert!(recording.webhooks().all(|w| w.status == Some(200)));
    let sessions: Vec<_> = recording.sessions().collect();
    assert_eq!(sessions.len(), 1);
    let open = sessions[0];
    assert_eq!((open.path.as_str(), open.status), ("/ws", 101));
    assert!(open.headers.iter().any(|(n, v)| n == "authorization" && v == "REDACTED"), "{:?}", open.headers);
    let caller: Vec<_> = recording.frames(1, Side::Caller).collect();
    let bot: Vec<_> = recording.frames(1, Side::Bot).collect();
    let data = |frames: &[&relay_record::Frame]| frames.iter().filter(|f| matches!(f.data, FrameData::Text(_))).count();
    assert_eq!((data(&caller), data(&bot)), (FRAMES as usize, FRAMES as usize));
    assert!(matches!(&caller.last().unwrap().data, FrameData::Close(Some(c)) if c.code == 1000));
    // Frames keep ACS's pace: the caller's span about (FRAMES - 1) x 20 ms.
    let span = caller[data(&caller) - 1].at_ms - caller[0].at_ms;
    assert!(span >= (FRAMES - 1) as f64 * 20.0 * 0.8, "caller frames span {span} ms");
    assert!(recording.entries.iter().any(|e| matches!(e, Entry::MediaClose(_))));
    assert_eq!(recording.end().map(|e| (e.reason.as_str(), e.dropped)), Some(("call disconnected", 0)));
    assert!(eventually(DEADLINE, || async { agent.metrics_text().contains("relay_agent_recordings 0") }).await);

    // Played back against the bot: the same statuses, the same frames.
    let options = PlayOptions::new(&stack.bot.url()).unwrap();
    let report = play(&recording, &options).await;
    assert!(report.matches(), "{}", report.render());
    assert_eq!(report.webhooks.len(), 3);
    let session = &report.sessions[0];
    assert_eq!(session.status.as_ref().ok(), Some(&101));
    assert_eq!(session.caller_frames, (FRAMES as usize + 1, FRAMES as usize + 1), "every frame and the close");
    assert_eq!(session.bot_frames, (FRAMES as usize, FRAMES as usize));
    assert_eq!(session.bot_close, (Some(Some(1000)), Some(Some(1000))));
    assert!(report.render().contains("result: the bot answered as recorded"), "{}", report.render());

    // A bot that answers differently is reported at the first place it does.
    let mut changed = recording.clone();
    let eleventh = changed
        .entries
        .iter_mut()
        .filter_map(|e| match e {
            Entry::Frame(f) if f.from == Side::Bot && matches!(f.data, FrameData::Text(_)) => Some(f),
            _ => None,
        })
        .nth(10)
        .unwrap();
    eleventh.data = FrameData::Text("something else".into());
    let report = play(&changed, &options).await;
    let first = report.first_divergence().unwrap_or_default();
    assert!(first.contains("bot frame 11"), "{}", report.render());

    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_of_the_next_call_keeps_media_that_opened_before_the_bot_answered_its_incoming_call() {
    let (stack, agent) = stack_with_inspecting_agent(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("call.jsonl");
    let mut recorder = record_next_call(&agent, &file).await;

    // A bot that answers its IncomingCall only after 1.5 s (it answers the call in the handler,
    // and ACS connects the media meanwhile).
    let public = stack.public();
    let incoming = tokio::spawn(async move {
        let request = post_json(public, "/api/incomingCall?delay_ms=1500", &acs::incoming_call_event(CALL));
        send_collect(public, request).await.map(|answer| answer.status())
    });
    // The recording takes the call as soon as the IncomingCall's body has passed to the bot.
    let claimed = || async { std::fs::read_to_string(&file).is_ok_and(|text| text.contains(CALL)) };
    assert!(eventually(DEADLINE, claimed).await, "{}", recorder.log());
    assert!(!incoming.is_finished(), "the recording took the call before the bot answered its IncomingCall");
    let mut media = acs::MediaCall::connect(public, "/ws", CALL).await.unwrap();
    let stats = media.stream_audio(10, DEADLINE).await.unwrap();
    assert!(stats.intact(), "{stats:?}");
    media.close(1000, "call ended").await.unwrap();
    assert!(!incoming.is_finished(), "the media session ran while the IncomingCall was unanswered");
    assert_eq!(incoming.await.unwrap().unwrap(), 200);
    let hangup = acs::callback_event("CallDisconnected", "conn-8d1e5a70", CALL);
    let callbacks = "/api/callbacks/conn-8d1e5a70";
    assert_eq!(send_collect(public, post_json(public, callbacks, &hangup)).await.unwrap().status(), 200);
    let status = recorder.wait_exit(DEADLINE).await;
    assert!(status.is_some_and(|s| s.success()), "{}", recorder.log());

    let recording = Recording::from_path(&file).unwrap();
    assert_eq!(recording.meta.call, CALL);
    let hooks: Vec<_> = recording.webhooks().collect();
    assert_eq!(hooks.len(), 2);
    let sessions: Vec<_> = recording.sessions().collect();
    assert_eq!(sessions.len(), 1, "the media session is in the recording");
    assert!(hooks[0].at_ms < sessions[0].at_ms, "the IncomingCall comes first, as it began first");
    let data = recording.frames(1, Side::Caller).filter(|f| matches!(f.data, FrameData::Text(_))).count();
    assert_eq!(data, 10);

    // Played back, the media again runs while the IncomingCall waits for its answer.
    let report = play(&recording, &PlayOptions::new(&stack.bot.url()).unwrap()).await;
    assert!(report.matches(), "{}", report.render());
    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_asked_for_with_inspection_off_or_a_bad_call_id_is_refused_in_one_line() {
    let stack = Stack::start_without_agent(|_| {}).await.unwrap();
    let state = stack.pair_agent("agent-1").await.unwrap();
    let agent = Agent::start(stack.agent_settings(&state).unwrap()).await.unwrap();
    let admin = agent.admin_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("call.jsonl");
    let agent_cli = Path::new(env!("CARGO_BIN_EXE_e2e-agent"));
    let run = async |args: Vec<String>| relay_testkit::procs::run_to_end(agent_cli, &args).await;
    let base = vec![
        "record".to_owned(),
        "--out".into(),
        file.display().to_string(),
        "--admin-listen".into(),
        admin.to_string(),
    ];
    let out = run(base.clone()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("inspection is off"), "{stderr}");
    assert!(!file.exists(), "no file is left behind for a refused recording");
    let err = relay_runtime::admin::fetch(admin, "/record?call=a%20b").await.unwrap_err().to_string();
    assert!(err.contains("403"), "inspection off answers first: {err}");
    agent.shutdown().await;

    let mut settings = stack.agent_settings(&state).unwrap();
    settings.inspect.enabled = true;
    let agent = Agent::start(settings).await.unwrap();
    let admin = agent.admin_addr().unwrap();
    let err = relay_runtime::admin::fetch(admin, "/record?call=a%20b").await.unwrap_err().to_string();
    assert!(err.contains("400") && err.contains("not a call id"), "{err}");
    std::fs::write(&file, "earlier recording").unwrap();
    let mut args = base;
    args[4] = admin.to_string();
    let out = run(args).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot create"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "earlier recording", "an existing file is never overwritten");
    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_recording_directory_every_call_is_recorded_and_the_oldest_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let calls_dir = dir.path().join("calls");
    let (stack, agent) = stack_with_inspecting_agent(|inspect| {
        inspect.record_dir = Some(calls_dir.clone());
        inspect.record_dir_max_calls = 2;
    })
    .await;

    let calls = [
        "0a1b2c3d-0000-4000-8000-000000000001",
        "0a1b2c3d-0000-4000-8000-000000000002",
        "0a1b2c3d-0000-4000-8000-000000000003",
    ];
    for call in calls {
        let done = acs::simulated_call(stack.public(), call, 5).await.unwrap();
        assert!(done.media.intact(), "{:?}", done.media);
        // Each call's recording ends with its CallDisconnected before the next starts.
        let ended = || async { agent.metrics_text().contains("relay_agent_recordings 0") };
        assert!(eventually(DEADLINE, ended).await, "{call}'s recording did not end");
    }
    let files = || {
        let mut files: Vec<std::path::PathBuf> =
            std::fs::read_dir(&calls_dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        files
    };
    // The files are written by their own tasks: wait until each has its last line.
    let written = || async { files().iter().all(|f| Recording::from_path(f).is_ok_and(|r| r.end().is_some())) };
    assert!(eventually(DEADLINE, written).await, "{:?}", files());
    let files = files();
    assert_eq!(files.len(), 2, "the directory keeps the newest two: {files:?}");
    for (file, call) in files.iter().zip(&calls[1..]) {
        assert!(file.to_string_lossy().ends_with(&format!("-{call}.jsonl")), "{file:?}");
        let recording = Recording::from_path(file).unwrap();
        assert_eq!(recording.meta.call, *call);
        assert_eq!(recording.webhooks().count(), 3);
        let data = recording.frames(1, Side::Bot).filter(|f| matches!(f.data, FrameData::Text(_))).count();
        assert_eq!(data, 5);
        assert_eq!(recording.end().map(|e| e.reason.as_str()), Some("call disconnected"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(file).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&calls_dir).unwrap().permissions().mode() & 0o777, 0o700);
    }
    agent.shutdown().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_fills_the_recording_directory_stops_being_recorded_and_the_file_says_why() {
    const MAX_BYTES: u64 = 32 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let calls_dir = dir.path().join("calls");
    let (stack, agent) = stack_with_inspecting_agent(|inspect| {
        inspect.record_dir = Some(calls_dir.clone());
        inspect.record_dir_max_bytes = MAX_BYTES;
    })
    .await;

    // 50 frames each way are about 90 KiB of recording: the call is relayed whole, its
    // recording stops near the bound.
    let done = acs::simulated_call(stack.public(), CALL, 50).await.unwrap();
    assert!(done.media.intact(), "{:?}", done.media);
    let file = || std::fs::read_dir(&calls_dir).unwrap().flatten().map(|e| e.path()).next();
    let ended = || async { file().is_some_and(|f| Recording::from_path(&f).is_ok_and(|r| r.end().is_some())) };
    assert!(eventually(DEADLINE, ended).await, "{:?}", file());
    let file = file().unwrap();
    let recording = Recording::from_path(&file).unwrap();
    let reason = recording.end().map(|e| e.reason.clone()).unwrap_or_default();
    assert!(reason.contains("record_dir_max_bytes"), "{reason}");
    let len = std::fs::metadata(&file).unwrap().len();
    // It may pass the bound by what is written between two checks (a sixteenth) and a line.
    assert!(len <= MAX_BYTES + MAX_BYTES / 16 + 4096, "{len} bytes");
    assert!(recording.frames(1, Side::Caller).count() < 50, "it stopped before the call's end");
    let files = std::fs::read_dir(&calls_dir).unwrap().count();
    assert_eq!(files, 1, "the rest of the call (its CallDisconnected) starts no new file");
    agent.shutdown().await;
    stack.shutdown().await;
}
