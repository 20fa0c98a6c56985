package lemonade_test

// These tests start the real server (the Python one, from the repository's
// venv, `make setup`) on a free port with the bundled tiny model and drive
// it through the generated stubs and this package.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"github.com/lemonade-grpc/lemonade-grpc/clients/go/lemonade"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"
)

type server struct {
	address string
	cmd     *exec.Cmd
	done    chan error
}

func freePort(t *testing.T) int {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	return listener.Addr().(*net.TCPAddr).Port
}

// startServer runs `lemonade-grpc serve` on port with stateDir and waits until Health says SERVING.
func startServer(t *testing.T, port int, stateDir string) *server {
	t.Helper()
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	python := filepath.Join(root, ".venv", "bin", "python")
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("no venv at %s: run `make setup` first", python)
	}
	address := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(python, "-m", "lemonade_grpc", "serve", "--listen", address, "--state-dir", stateDir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{address: address, cmd: cmd, done: make(chan error, 1)}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() { s.stop(t) })

	conn := dial(t, address)
	health := healthpb.NewHealthClient(conn)
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		reply, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && reply.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return s
		}
		select {
		case err := <-s.done:
			t.Fatalf("server exited before serving: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not serving within 60 s: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // polling a deadline, not guessing
	}
}

// stop sends SIGTERM and waits for the exit (idempotent); it must be status 0.
func (s *server) stop(t *testing.T) {
	t.Helper()
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("server exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		t.Errorf("server did not exit within 30 s of SIGTERM")
		<-s.done
	}
}

func dial(t *testing.T, address string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func load(ctx context.Context, t *testing.T, control lemonadev1.ModelControlClient, request *lemonadev1.LoadRequest) []*lemonadev1.LoadResponse {
	t.Helper()
	stream, err := control.Load(ctx, request)
	if err != nil {
		t.Fatal(err)
	}
	var progress []*lemonadev1.LoadResponse
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return progress
		}
		if err != nil {
			t.Fatalf("load %s: %v", request.GetModel(), err)
		}
		progress = append(progress, message)
	}
}

func TestLoadPinStatusCompleteAndErrorReasons(t *testing.T) {
	s := startServer(t, freePort(t), t.TempDir())
	conn := dial(t, s.address)
	control := lemonadev1.NewModelControlClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	progress := load(ctx, t, control, &lemonadev1.LoadRequest{Model: "tiny"})
	if first := progress[0].GetPhase(); first != lemonadev1.LoadPhase_LOAD_PHASE_QUEUED {
		t.Errorf("first phase %v, want QUEUED", first)
	}
	ready := progress[len(progress)-1]
	if ready.GetPhase() != lemonadev1.LoadPhase_LOAD_PHASE_READY || ready.GetStatus().GetPid() == 0 {
		t.Fatalf("last progress %v, want READY with a pid", ready)
	}

	pinned, err := control.Pin(ctx, &lemonadev1.PinRequest{Model: "tiny", Pinned: proto.Bool(true)})
	if err != nil || !pinned.GetStatus().GetPinned() {
		t.Fatalf("pin: %v %v", pinned, err)
	}
	status, err := control.Status(ctx, &lemonadev1.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	models := status.GetPool().GetModels()
	if len(models) != 1 || models[0].GetName() != "tiny" || !models[0].GetPinned() {
		t.Fatalf("status models %v, want tiny pinned", models)
	}

	completion, err := lemonadev1.NewInferenceClient(conn).Complete(ctx, &lemonadev1.CompleteRequest{
		Model: "tiny", Prompt: "Once", MaxTokens: proto.Uint32(4), Seed: proto.Uint32(1),
	})
	if err != nil {
		t.Fatal(err)
	}
	var tokens uint32
	var last *lemonadev1.CompleteResponse
	for {
		reply, err := completion.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		tokens += reply.GetTokenCount()
		last = reply
	}
	if tokens != 4 || last.GetUsage().GetCompletionTokens() != 4 {
		t.Errorf("completion: %d tokens, usage %v; want 4", tokens, last.GetUsage())
	}

	_, err = control.Pin(ctx, &lemonadev1.PinRequest{Model: "nope", Pinned: proto.Bool(true)})
	details, ok := lemonade.Details(err)
	if !ok || details.Code != codes.NotFound || details.Reason != "MODEL_NOT_FOUND" || details.Domain != lemonade.Domain {
		t.Errorf("unknown model: %+v", details)
	}
	stream, err := control.Load(ctx, &lemonadev1.LoadRequest{
		Model: "tiny", Options: &lemonadev1.LoadOptions{BackendArgs: &lemonadev1.BackendArgs{Args: []string{"--tools", "all"}}},
	})
	if err == nil {
		_, err = stream.Recv()
	}
	details, _ = lemonade.Details(err)
	if details.Reason != "INVALID_OPTIONS" || len(details.BadFields) != 1 || details.BadFields[0] != "options.backend_args.args" {
		t.Errorf("refused flag: %+v", details)
	}
	if lemonade.Reason(errors.New("not a call")) != "" {
		t.Errorf("a plain error has a reason")
	}
}

func TestWatchResumesAcrossAServerRestart(t *testing.T) {
	port, stateDir := freePort(t), t.TempDir()
	first := startServer(t, port, stateDir)
	conn := dial(t, first.address)
	control := lemonadev1.NewModelControlClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	messages := make(chan *lemonadev1.WatchResponse, 1000)
	watched := make(chan error, 1)
	go func() {
		watched <- lemonade.Watch(ctx, control, nil, func(m *lemonadev1.WatchResponse) error {
			messages <- m
			return nil
		})
	}()
	var seen []*lemonadev1.WatchResponse
	waitFor := func(what string, match func(*lemonadev1.WatchResponse) bool) *lemonadev1.WatchResponse {
		t.Helper()
		for {
			select {
			case m := <-messages:
				seen = append(seen, m)
				if match(m) {
					return m
				}
			case <-ctx.Done():
				t.Fatalf("no Watch message %s (saw %d)", what, len(seen))
			}
		}
	}
	isLoaded := func(m *lemonadev1.WatchResponse) bool { return m.GetModelLoaded() != nil }

	waitFor("snapshot", func(m *lemonadev1.WatchResponse) bool { return m.GetSnapshot() != nil })
	load(ctx, t, control, &lemonadev1.LoadRequest{Model: "tiny"})
	loaded := waitFor("tiny loaded", isLoaded)

	first.stop(t) // the Watch breaks; it keeps reconnecting
	startServer(t, port, stateDir)
	resync := waitFor("resync snapshot", func(m *lemonadev1.WatchResponse) bool { return m.GetResync() })
	if resync.GetSnapshot() == nil || resync.GetSequence() <= loaded.GetSequence() {
		t.Fatalf("resync %v after loaded %d: want a snapshot numbered above the old run", resync, loaded.GetSequence())
	}
	load(ctx, t, control, &lemonadev1.LoadRequest{Model: "tiny"})
	again := waitFor("tiny loaded again", isLoaded)
	cancel()
	if err := <-watched; !errors.Is(err, context.Canceled) {
		t.Errorf("Watch ended with %v, want context.Canceled", err)
	}

	sequences := map[uint64]bool{}
	for _, m := range seen {
		if sequences[m.GetSequence()] {
			t.Errorf("sequence %d handled twice", m.GetSequence())
		}
		sequences[m.GetSequence()] = true
	}
	// After the resync, every event in order, none missing.
	next := resync.GetSequence() + 1
	for _, m := range seen {
		if m.GetSequence() > resync.GetSequence() {
			if m.GetSequence() != next {
				t.Fatalf("after the resync: sequence %d, want %d", m.GetSequence(), next)
			}
			next++
		}
	}
	if again.GetSequence() <= resync.GetSequence() {
		t.Errorf("loaded again at %d, before the resync %d", again.GetSequence(), resync.GetSequence())
	}
}
