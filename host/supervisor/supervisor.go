// Package supervisor keeps the signing enclave running under systemd.
//
// `nitro-cli run-enclave` returns once the enclave has booted, and the
// enclave then lives on its own: when the signer exits, the enclave's init
// reboots, which ends the enclave, and nothing on the parent notices. The
// supervisor is the process systemd watches in its place: it starts the
// enclave (terminating one of the same name left by an earlier run), then
// polls `nitro-cli describe-enclaves`; when the enclave is gone, or no
// longer RUNNING, it fails, so that the unit's Restart= starts a new one,
// with systemd's backoff. On SIGTERM (systemctl stop) it terminates the
// enclave and exits 0. The proxy reconnects by itself whichever enclave
// answers on the CID.
//
// nitro-cli is run as a program (Config.NitroCLI): its JSON output is the
// documented interface (aws-nitro-enclaves-cli, "nitro-cli describe-enclaves").
package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// Config is what the enclave is started with.
type Config struct {
	// NitroCLI is the nitro-cli program. Default "nitro-cli" (from PATH).
	NitroCLI string
	// Name is the enclave's name (nitro-cli --enclave-name); an enclave
	// of this name found at start is terminated first. Default nitrosign.
	Name string
	// EIF is the enclave image (scripts/build-eif.sh). Required.
	EIF string
	// CID is the enclave's vsock CID, >= 4: the proxy's --upstream is
	// vsock://CID:5005. Default 16.
	CID uint32
	// CPUCount and MemoryMiB are the enclave's vCPUs and memory, within
	// what deploy/allocator.yaml reserves. Defaults 2 and 512.
	CPUCount  int
	MemoryMiB int
	// Debug starts the enclave in debug mode: its console is readable,
	// and its attestation PCRs are ALL ZERO. Development only.
	Debug bool
	// Poll is how often the enclave is looked at. Default 2s.
	Poll time.Duration
	// CommandTimeout bounds run-enclave, which boots the enclave (seconds,
	// more for a large one). Default 5m.
	CommandTimeout time.Duration
	// PollTimeout bounds the other nitro-cli commands (describe-enclaves,
	// terminate-enclave): three polls in a row without an answer end Run.
	// Default 30s.
	PollTimeout time.Duration
	// Watchdog is systemd's WatchdogSec (daemon.SdWatchdogEnabled): Run
	// sends WATCHDOG=1 at half of it. 0: no pings.
	Watchdog time.Duration
}

// DefaultConfig returns the documented defaults (EIF has none).
func DefaultConfig() Config {
	return Config{NitroCLI: "nitro-cli", Name: "nitrosign", CID: 16, CPUCount: 2, MemoryMiB: 512,
		Poll: 2 * time.Second, CommandTimeout: 5 * time.Minute, PollTimeout: 30 * time.Second}
}

// Validate reports every invalid field.
func (c Config) Validate() error {
	var errs []error
	if c.NitroCLI == "" {
		errs = append(errs, errors.New("nitro-cli program: none given"))
	}
	if c.Name == "" {
		errs = append(errs, errors.New("enclave name: none given"))
	}
	if c.EIF == "" {
		errs = append(errs, errors.New("EIF: none given; want the image scripts/build-eif.sh built (ENCLAVE_EIF, --eif)"))
	}
	if c.CID < 4 || c.CID == 0xFFFFFFFF {
		errs = append(errs, fmt.Errorf("CID %d: an enclave CID is 4 to 4294967294 (0-3 are reserved, 1 is local loopback)", c.CID))
	}
	if c.CPUCount < 1 {
		errs = append(errs, fmt.Errorf("CPU count %d: must be >= 1", c.CPUCount))
	}
	if c.MemoryMiB < 64 {
		errs = append(errs, fmt.Errorf("memory %d MiB: must be >= 64", c.MemoryMiB))
	}
	if c.Poll <= 0 {
		errs = append(errs, fmt.Errorf("poll interval %v: must be > 0", c.Poll))
	}
	if c.CommandTimeout <= 0 || c.PollTimeout <= 0 {
		errs = append(errs, fmt.Errorf("command timeouts %v, %v: must be > 0", c.CommandTimeout, c.PollTimeout))
	}
	if c.Watchdog < 0 {
		errs = append(errs, fmt.Errorf("watchdog %v: must not be negative", c.Watchdog))
	}
	return errors.Join(errs...)
}

// Enclave is one entry of `nitro-cli describe-enclaves` (and the output
// of run-enclave), the fields the supervisor uses.
type Enclave struct {
	EnclaveName string `json:"EnclaveName"`
	EnclaveID   string `json:"EnclaveID"`
	EnclaveCID  uint64 `json:"EnclaveCID"`
	State       string `json:"State"`
	Flags       string `json:"Flags"`
}

// ErrEnclaveGone is wrapped by Run's error when the enclave stopped by
// itself.
var ErrEnclaveGone = errors.New("enclave gone")

// Notify is told about the supervisor's state for systemd (READY=1,
// STATUS=..., WATCHDOG=1, STOPPING=1); nil: nobody.
type Notify func(state string)

// Supervisor runs one enclave.
type Supervisor struct {
	cfg    Config
	log    *zap.Logger
	notify Notify
}

// New returns a Supervisor for cfg (validated).
func New(cfg Config, log *zap.Logger, notify Notify) (*Supervisor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if notify == nil {
		notify = func(string) {}
	}
	return &Supervisor{cfg: cfg, log: log, notify: notify}, nil
}

// Run starts the enclave and watches it until ctx ends (then it
// terminates the enclave and returns nil) or the enclave is gone (an error
// wrapping ErrEnclaveGone). A failure to start it is returned as is, with
// nitro-cli's own message.
func (s *Supervisor) Run(ctx context.Context) error {
	// systemd's watchdog sees the supervisor alive while it runs, whatever
	// nitro-cli takes; nitro-cli hanging is the polls' concern.
	stopPings := s.pingWatchdog()
	defer stopPings()
	if err := s.terminateLeftovers(ctx); err != nil {
		if ctx.Err() != nil {
			// Stopped while looking: what may be half-terminated is ended.
			return s.terminateOurs()
		}
		return err
	}
	e, err := s.start(ctx)
	if err != nil {
		if ctx.Err() != nil {
			// Stopped while starting: what run-enclave left is ended.
			return s.terminateOurs()
		}
		return err
	}
	s.log.Info("enclave running", zap.String("enclave_id", e.EnclaveID), zap.String("name", e.EnclaveName),
		zap.Uint64("cid", e.EnclaveCID), zap.Bool("debug_mode", s.cfg.Debug))
	if s.cfg.Debug {
		s.log.Warn("DEBUG MODE: the enclave's console is readable and its attestation PCRs are ALL ZERO; never in production")
	}
	s.notify(fmt.Sprintf("READY=1\nSTATUS=enclave %s running (CID %d)", e.EnclaveID, e.EnclaveCID))
	err = s.watch(ctx, e.EnclaveID)
	if ctx.Err() != nil {
		s.notify("STOPPING=1")
		return s.stop(e.EnclaveID)
	}
	return err
}

// watch polls describe-enclaves until the enclave is gone or ctx ends.
func (s *Supervisor) watch(ctx context.Context, id string) error {
	t := time.NewTicker(s.cfg.Poll)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		list, err := s.describe(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			failures++
			s.log.Warn("nitro-cli describe-enclaves failed", zap.Error(err), zap.Int("in_a_row", failures))
			if failures >= 3 {
				return fmt.Errorf("%w: its state is unknown, nitro-cli describe-enclaves failed %d times in a row: %v", ErrEnclaveGone, failures, err)
			}
			continue
		}
		failures = 0
		var e *Enclave
		for i := range list {
			if list[i].EnclaveID == id {
				e = &list[i]
			}
		}
		switch {
		case e == nil:
			return fmt.Errorf("%w: enclave %s is no longer listed by nitro-cli describe-enclaves (the signer exited, or the enclave was terminated)", ErrEnclaveGone, id)
		case e.State != "RUNNING":
			return fmt.Errorf("%w: enclave %s is %s", ErrEnclaveGone, id, e.State)
		}
	}
}

// pingWatchdog sends WATCHDOG=1 at half of Config.Watchdog until the
// returned function is called (nothing when Watchdog is 0).
func (s *Supervisor) pingWatchdog() func() {
	if s.cfg.Watchdog <= 0 {
		return func() {}
	}
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(s.cfg.Watchdog / 2)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				s.notify("WATCHDOG=1")
			case <-done:
				return
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
	}
}

// terminateLeftovers terminates enclaves of our name, left by an earlier
// run whose supervisor died: their CID would block the new one. Another
// enclave on our CID is not ours to terminate: that is an error.
func (s *Supervisor) terminateLeftovers(ctx context.Context) error {
	list, err := s.describe(ctx)
	if err != nil {
		return err
	}
	for _, e := range list {
		if e.EnclaveName != s.cfg.Name {
			if e.EnclaveCID == uint64(s.cfg.CID) {
				return fmt.Errorf("CID %d is taken by enclave %s (name %q): give this one another CID, or terminate that one", s.cfg.CID, e.EnclaveID, e.EnclaveName)
			}
			continue
		}
		s.log.Warn("terminating an enclave left by an earlier run", zap.String("enclave_id", e.EnclaveID),
			zap.String("name", e.EnclaveName), zap.Uint64("cid", e.EnclaveCID), zap.String("state", e.State))
		if _, err := s.nitro(ctx, "terminate-enclave", "--enclave-id", e.EnclaveID); err != nil {
			return fmt.Errorf("terminate the enclave %s left by an earlier run: %w", e.EnclaveID, err)
		}
	}
	return nil
}

// start runs the enclave.
func (s *Supervisor) start(ctx context.Context) (Enclave, error) {
	args := []string{"run-enclave", "--eif-path", s.cfg.EIF, "--cpu-count", strconv.Itoa(s.cfg.CPUCount),
		"--memory", strconv.Itoa(s.cfg.MemoryMiB), "--enclave-cid", strconv.FormatUint(uint64(s.cfg.CID), 10),
		"--enclave-name", s.cfg.Name}
	if s.cfg.Debug {
		args = append(args, "--debug-mode")
	}
	out, err := s.nitro(ctx, args...)
	if err != nil {
		return Enclave{}, fmt.Errorf("start the enclave: %w", err)
	}
	var e Enclave
	if err := json.Unmarshal(jsonPart(out), &e); err != nil || e.EnclaveID == "" {
		return Enclave{}, fmt.Errorf("start the enclave: nitro-cli run-enclave printed no enclave description: %q", trim(out))
	}
	return e, nil
}

// terminateOurs terminates every enclave of our name, after a stop that
// came while one was starting.
func (s *Supervisor) terminateOurs() error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.CommandTimeout)
	defer cancel()
	list, err := s.describe(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range list {
		if e.EnclaveName == s.cfg.Name {
			errs = append(errs, s.stop(e.EnclaveID))
		}
	}
	return errors.Join(errs...)
}

// stop terminates the enclave at the end of Run.
func (s *Supervisor) stop(id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.CommandTimeout)
	defer cancel()
	if _, err := s.nitro(ctx, "terminate-enclave", "--enclave-id", id); err != nil {
		return fmt.Errorf("terminate enclave %s: %w", id, err)
	}
	s.log.Info("enclave terminated", zap.String("enclave_id", id))
	return nil
}

// describe lists the enclaves.
func (s *Supervisor) describe(ctx context.Context) ([]Enclave, error) {
	out, err := s.nitro(ctx, "describe-enclaves")
	if err != nil {
		return nil, err
	}
	var list []Enclave
	if err := json.Unmarshal(jsonPart(out), &list); err != nil {
		return nil, fmt.Errorf("nitro-cli describe-enclaves printed no enclave list: %q", trim(out))
	}
	return list, nil
}

// nitro runs nitro-cli with args and returns its standard output; a
// failure carries what it printed on standard error.
func (s *Supervisor) nitro(ctx context.Context, args ...string) ([]byte, error) {
	timeout := s.cfg.PollTimeout
	if args[0] == "run-enclave" {
		timeout = s.cfg.CommandTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.cfg.NitroCLI, args...)
	// A nitro-cli that hangs is killed at the timeout with everything it
	// started (its own process group), and its output pipes are not waited
	// for beyond a moment after.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return nil, fmt.Errorf("nitro-cli %s: no answer within %v (killed)", args[0], timeout)
		}
		msg := trim(stderr.Bytes())
		if msg == "" {
			msg = trim(stdout.Bytes())
		}
		if msg != "" {
			return nil, fmt.Errorf("nitro-cli %s: %w: %s", args[0], err, msg)
		}
		return nil, fmt.Errorf("nitro-cli %s: %w", args[0], err)
	}
	return stdout.Bytes(), nil
}

// jsonPart is the JSON document in nitro-cli's output: run-enclave prints
// progress lines ("Start allocating memory...") before it.
func jsonPart(out []byte) []byte {
	i := bytes.IndexAny(out, "[{")
	if i < 0 {
		return out
	}
	return out[i:]
}

// trim shortens nitro-cli's output for an error message.
func trim(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 2000 {
		s = s[:2000] + "..."
	}
	return s
}
