// Command nitrosign-supervisor keeps the nitrosign enclave running: it
// starts it with nitro-cli run-enclave, watches it with nitro-cli
// describe-enclaves, and exits 1 when it is gone so that systemd's
// Restart= starts a new one (deploy/nitrosign-enclave.service); on SIGTERM
// it terminates the enclave and exits 0.
//
// Usage:
//
//	nitrosign-supervisor --config /etc/nitrosign/enclave.env
//	nitrosign-supervisor --eif /opt/nitrosign/nitrosign-enclave.eif --cid 16
//
// Run nitrosign-supervisor -h for every flag.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/supervisor"
	"github.com/nitrosign/nitrosign/internal/logging"
)

const usage = `nitrosign-supervisor: start the nitrosign enclave and keep it running.

It terminates an enclave of the same name left by an earlier run, starts
the EIF with nitro-cli run-enclave, tells systemd READY=1, then polls
nitro-cli describe-enclaves. When the enclave is gone (the signer exited,
which ends the enclave) it exits 1, and systemd's Restart= starts it again;
on SIGTERM it terminates the enclave and exits 0.

Usage:
  nitrosign-supervisor [--config FILE] [flags]

Examples:
  # what deploy/nitrosign-enclave.service runs
  nitrosign-supervisor --config /etc/nitrosign/enclave.env
  # by hand
  sudo nitrosign-supervisor --eif build/eif/nitrosign-enclave.eif --cid 16 --memory 512

Flags (given after --config, or in any order, they override the file):
`

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// run returns the exit status: 0 after -h or a stop, 2 for a bad command
// line, 1 when the enclave could not start or is gone.
func run(args []string, stderr io.Writer) int {
	cfg, logCfg, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	log, err := logging.New(logCfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nitrosign-supervisor: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if wd, err := daemon.SdWatchdogEnabled(false); err == nil && wd > 0 {
		cfg.Watchdog = wd
	}
	s, err := supervisor.New(cfg, log, notify(log))
	if err != nil {
		log.Error("start-up failed", zap.Error(err))
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = s.Run(ctx)
	switch {
	case err == nil:
		log.Info("stopped")
		return 0
	case errors.Is(err, supervisor.ErrEnclaveGone):
		log.Error("the enclave is gone: exiting so that systemd starts it again", zap.Error(err),
			zap.String("hint", "the signer's last log lines are in the proxy's log (logger enclave.*, nitrosign-proxy --enclave-log-port); nitro-cli's in /var/log/nitro_enclaves"))
	case errors.Is(err, exec.ErrNotFound):
		log.Error("the enclave could not be started", zap.Error(err),
			zap.String("hint", "install nitro-cli (aws-nitro-enclaves-cli, docs/DEPLOY.md section 1) or give its path with --nitro-cli"))
	default:
		log.Error("the enclave could not be started", zap.Error(err),
			zap.String("hint", "the cause above is nitro-cli's; see docs/DEPLOY.md, Troubleshooting, and /var/log/nitro_enclaves"))
	}
	return 1
}

// notify sends state to systemd when it runs us as Type=notify (nothing
// otherwise).
func notify(log *zap.Logger) supervisor.Notify {
	return func(state string) {
		if _, err := daemon.SdNotify(false, state); err != nil {
			log.Warn("systemd notification failed", zap.Error(err))
		}
	}
}

// parseFlags reads --config, then the flags. It prints what is wrong.
func parseFlags(args []string, stderr io.Writer) (supervisor.Config, logging.Config, error) {
	cfg := supervisor.DefaultConfig()
	logCfg := logging.Config{Level: "info", Format: "json"}
	fs := flag.NewFlagSet("nitrosign-supervisor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	config := fs.String("config", "", "read ENCLAVE_NAME, ENCLAVE_EIF, ENCLAVE_CID, ENCLAVE_CPU_COUNT, ENCLAVE_MEMORY_MIB and ENCLAVE_DEBUG from this `file` (deploy/enclave.env)")
	fs.StringVar(&cfg.EIF, "eif", cfg.EIF, "the enclave image `file` (scripts/build-eif.sh)")
	cid := fs.Uint("cid", uint(cfg.CID), "the enclave's vsock CID, >= 4 (the proxy's --upstream is vsock://CID:5005)")
	fs.IntVar(&cfg.CPUCount, "cpu-count", cfg.CPUCount, "vCPUs, within deploy/allocator.yaml")
	fs.IntVar(&cfg.MemoryMiB, "memory", cfg.MemoryMiB, "memory in `MiB`, within deploy/allocator.yaml")
	fs.StringVar(&cfg.Name, "name", cfg.Name, "the enclave's name (nitro-cli --enclave-name)")
	fs.BoolVar(&cfg.Debug, "debug-mode", cfg.Debug, "DEVELOPMENT ONLY: console readable, attestation PCRs ALL ZERO")
	fs.StringVar(&cfg.NitroCLI, "nitro-cli", cfg.NitroCLI, "the nitro-cli `program`")
	fs.DurationVar(&cfg.Poll, "poll", cfg.Poll, "how often the enclave is looked at (nitro-cli describe-enclaves)")
	fs.DurationVar(&cfg.CommandTimeout, "command-timeout", cfg.CommandTimeout, "bound of nitro-cli run-enclave, which boots the enclave")
	fs.DurationVar(&cfg.PollTimeout, "poll-timeout", cfg.PollTimeout, "bound of the other nitro-cli commands; three polls in a row without an answer end the supervisor")
	fs.StringVar(&logCfg.Level, "log-level", logCfg.Level, "log `level`: debug, info, warn or error")
	fs.StringVar(&logCfg.Format, "log-format", logCfg.Format, "log `format`: json or console")
	fail := func(err error) (supervisor.Config, logging.Config, error) {
		fmt.Fprintf(stderr, "nitrosign-supervisor: %v\nsee nitrosign-supervisor -h\n", err)
		return supervisor.Config{}, logCfg, err
	}
	if err := fs.Parse(args); err != nil {
		return supervisor.Config{}, logCfg, err
	}
	if fs.NArg() > 0 {
		return fail(fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0)))
	}
	if *cid > 0xFFFFFFFF {
		return fail(fmt.Errorf("--cid %d does not fit 32 bits", *cid))
	}
	cfg.CID = uint32(*cid)
	if *config != "" {
		// The file gives the base; flags given on the command line win.
		given := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
		fileCfg, err := loadEnv(*config, cfg, given)
		if err != nil {
			return fail(err)
		}
		cfg = fileCfg
	}
	if err := errors.Join(cfg.Validate(), logCfg.Validate()); err != nil {
		return fail(err)
	}
	return cfg, logCfg, nil
}

// loadEnv applies the settings of an enclave.env file (NAME=value lines,
// # comments, optional quotes) to cfg, except those whose flag was given.
func loadEnv(path string, cfg supervisor.Config, given map[string]bool) (supervisor.Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return cfg, fmt.Errorf("config %s:%d: want NAME=value, got %q", path, n, line)
		}
		v = strings.Trim(strings.TrimSpace(v), `"'`)
		num := func() (int, error) {
			i, err := strconv.Atoi(v)
			if err != nil {
				return 0, fmt.Errorf("config %s:%d: %s=%q is not a number", path, n, k, v)
			}
			return i, nil
		}
		switch strings.TrimSpace(k) {
		case "ENCLAVE_NAME":
			if !given["name"] {
				cfg.Name = v
			}
		case "ENCLAVE_EIF":
			if !given["eif"] {
				cfg.EIF = v
			}
		case "ENCLAVE_CID":
			i, err := num()
			if err != nil {
				return cfg, err
			}
			if i < 0 || int64(i) > 0xFFFFFFFF {
				return cfg, fmt.Errorf("config %s:%d: ENCLAVE_CID=%d does not fit 32 bits", path, n, i)
			}
			if !given["cid"] {
				cfg.CID = uint32(i)
			}
		case "ENCLAVE_CPU_COUNT":
			i, err := num()
			if err != nil {
				return cfg, err
			}
			if !given["cpu-count"] {
				cfg.CPUCount = i
			}
		case "ENCLAVE_MEMORY_MIB":
			i, err := num()
			if err != nil {
				return cfg, err
			}
			if !given["memory"] {
				cfg.MemoryMiB = i
			}
		case "ENCLAVE_DEBUG":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return cfg, fmt.Errorf("config %s:%d: ENCLAVE_DEBUG=%q: want true or false", path, n, v)
			}
			if !given["debug-mode"] {
				cfg.Debug = b
			}
		default:
			return cfg, fmt.Errorf("config %s:%d: unknown setting %q (want ENCLAVE_NAME, ENCLAVE_EIF, ENCLAVE_CID, ENCLAVE_CPU_COUNT, ENCLAVE_MEMORY_MIB or ENCLAVE_DEBUG)", path, n, k)
		}
	}
	if err := sc.Err(); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}
