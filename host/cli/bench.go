package cli

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"

	"github.com/nitrosign/nitrosign/host/bench"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/target"
)

// loadFlags are the workload and load-shape flags bench and compare share.
type loadFlags struct {
	cfg      bench.Config
	work     bench.Workload
	rpc      string
	jsonFile string
	chart    string
	output   string
	watch    pidList
	cpuProf  string
}

func (l *loadFlags) register(fs *flag.FlagSet) {
	l.cfg = bench.DefaultConfig()
	l.work = bench.DefaultWorkload()
	fs.StringVar(&l.rpc, "rpc", string(l.work.RPC), "call to make: echo or sign")
	fs.IntVar(&l.work.PayloadSize, "payload-size", l.work.PayloadSize, "echo: payload size in bytes")
	fs.StringVar(&l.work.KeyType, "key-type", l.work.KeyType, "sign: key to sign with: rsa, ecc or ed25519")
	fs.StringVar(&l.work.Algorithm, "algorithm", "", "sign: KMS algorithm name, e.g. ECDSA_SHA_256, RSASSA_PSS_SHA_256 (default: the key's default)")
	fs.StringVar(&l.work.MessageType, "message-type", l.work.MessageType, "sign: raw (the server hashes) or digest (the bench sends the hash)")
	fs.IntVar(&l.work.MessageSize, "message-size", l.work.MessageSize, "sign: size in bytes of the message signed (raw: at most 4096) or hashed (digest)")
	fs.IntVar(&l.cfg.Connections, "connections", l.cfg.Connections, "long-lived connections the workers share (worker i uses connection i mod N)")
	fs.IntVar(&l.cfg.Concurrency, "concurrency", l.cfg.Concurrency, "workers, i.e. the most calls in flight at once")
	fs.DurationVar(&l.cfg.Duration, "duration", l.cfg.Duration, "length of the measured part (not with --requests)")
	fs.Int64Var(&l.cfg.Requests, "requests", 0, "measure this many calls instead of a duration")
	fs.DurationVar(&l.cfg.Warmup, "warmup", time.Second, "unrecorded load before the measured part")
	fs.Float64Var(&l.cfg.Rate, "rate", 0, "open loop: schedule this many calls per second and measure latency from each call's intended send time (0: closed loop)")
	fs.IntVar(&l.cfg.ConnectEvery, "connect-every", 0, "open a fresh connection every N calls per worker, as short-lived clients do (0: long-lived connections)")
	fs.DurationVar(&l.cfg.CallTimeout, "call-timeout", l.cfg.CallTimeout, "deadline of each call")
	fs.StringVar(&l.jsonFile, "json", "", "also write the full results, percentile curve included, as JSON to `FILE`")
	fs.StringVar(&l.chart, "chart", "", "write a latency percentile chart to `FILE` (.svg, or .html for a page with a table)")
	fs.StringVar(&l.output, "output", "text", "stdout format: text or json")
	fs.StringVar(&l.cpuProf, "cpu-profile", "", "write the bench's own CPU profile (go tool pprof) to `FILE`: is the load generator the bottleneck?")
	fs.Var(&l.watch, "watch-pid", "report the memory and CPU per call of process `PID` during the run; \"self\" is the bench itself (repeatable; Linux)")
}

// validate finishes the flags after parsing: --requests replaces the
// default duration, and every value is checked.
func (l *loadFlags) validate(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if set["requests"] {
		if set["duration"] {
			return usagef("give --duration or --requests, not both")
		}
		l.cfg.Duration = 0
	}
	if set["connect-every"] && set["connections"] && l.cfg.ConnectEvery > 0 {
		return usagef("--connections does not apply with --connect-every: each worker opens its own connections")
	}
	l.work.RPC = bench.RPC(l.rpc)
	if err := l.work.Validate(); err != nil {
		return usagef("%v", err)
	}
	if err := l.cfg.Validate(); err != nil {
		return usagef("%s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	if l.output != "text" && l.output != "json" {
		return usagef("--output %q: want text or json", l.output)
	}
	if l.chart != "" {
		if _, err := chartFormat(l.chart); err != nil {
			return err
		}
	}
	return nil
}

func chartFormat(name string) (bench.ChartFormat, error) {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".svg":
		return bench.ChartSVG, nil
	case ".html", ".htm":
		return bench.ChartHTML, nil
	}
	return 0, usagef("--chart %q: the file name must end in .svg or .html", name)
}

// progress returns where the live progress line goes: stderr when it is a
// terminal, nowhere otherwise (logs and pipes get only the summary).
func progress(io IO) io.Writer {
	f, ok := io.Stderr.(*os.File)
	if !ok {
		return nil
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return f
}

// pidList collects --watch-pid.
type pidList []int

func (p *pidList) String() string { return fmt.Sprint([]int(*p)) }

func (p *pidList) Set(s string) error {
	if s == "self" {
		*p = append(*p, os.Getpid())
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return fmt.Errorf("%q is not a process id", s)
	}
	*p = append(*p, n)
	return nil
}

// profile starts the bench's own CPU profile when --cpu-profile is given;
// the returned func stops it.
func (l *loadFlags) profile() (stop func() error, err error) {
	if l.cpuProf == "" {
		return func() error { return nil }, nil
	}
	f, err := os.Create(l.cpuProf)
	if err != nil {
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("--cpu-profile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		return f.Close()
	}, nil
}

// writeOutputs prints the summary (text or JSON) and writes the JSON and
// chart files.
func (l *loadFlags) writeOutputs(io IO, v any, text func(w io.Writer) error, title string, results []*bench.Result) error {
	if l.output == "json" {
		if err := printJSON(io.Stdout, v); err != nil {
			return err
		}
	} else if err := text(io.Stdout); err != nil {
		return err
	}
	if l.jsonFile != "" {
		var b bytes.Buffer
		if err := printJSON(&b, v); err != nil {
			return err
		}
		if err := os.WriteFile(l.jsonFile, b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write --json file: %w", err)
		}
	}
	if l.chart != "" {
		f, _ := chartFormat(l.chart) // validated
		var b bytes.Buffer
		if err := bench.WriteChart(&b, title, results, f); err != nil {
			return err
		}
		if err := os.WriteFile(l.chart, b.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write --chart file: %w", err)
		}
	}
	return nil
}

// failedAll is the error of a run in which no call succeeded.
func failedAll(results []*bench.Result) error {
	var bad []string
	for _, r := range results {
		if r.Successes == 0 {
			msg := r.Name + ": no call succeeded"
			if len(r.Errors) > 0 {
				msg += fmt.Sprintf(" (%s: %s)", r.Errors[0].Code, r.Errors[0].Example)
			}
			bad = append(bad, msg)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	return errors.New(strings.Join(bad, "; "))
}

const benchUsage = `Usage: nitrosign bench [flags]

Load-tests one target with Echo or Sign calls and reports requests,
successes, errors by status code, throughput, and latency (min, mean, p50,
p90, p99, p99.9, max) from an HDR histogram. A progress line is shown while
stderr is a terminal.

Closed loop (default): --concurrency workers call back to back; the result
is the target's throughput at that concurrency. Open loop (--rate): calls
are scheduled at a constant rate and latency is measured from each call's
intended send time, so stalls are not hidden (coordinated omission
corrected); the latency from the actual send time is reported beside it.

Examples:
  # Echo against the host proxy, 64 in flight over 2 connections, 10 s
  nitrosign bench --target tcp://127.0.0.1:8443 --concurrency 64 --connections 2

  # The enclave directly over vsock: ECDSA P-256 signatures for 20,000 calls
  nitrosign bench --target vsock://16:5005 --rpc sign --key-type ecc --requests 20000 --concurrency 16

  # Open loop: 5,000 calls/s for 30 s, percentiles from intended send times
  nitrosign bench --rate 5000 --concurrency 64 --duration 30s --json rate.json

  # Connection churn: a fresh connection every 10 calls, 64 workers
  nitrosign bench --concurrency 64 --connect-every 10 --duration 10s

  # Report the server's memory while it is under 256 calls in flight
  nitrosign bench --target tcp://127.0.0.1:7001 --concurrency 256 --connections 4 --watch-pid 4242
`

func runBench(ctx context.Context, c *cmd, args []string) error {
	var l loadFlags
	addr := c.String("target", DefaultTarget, "server: vsock://CID:PORT (enclave) or tcp://HOST:PORT (proxy)")
	name := c.String("name", "", "label of the target in reports (default: the target address)")
	identity := c.String("identity", "", "sign: authenticate the calls as the caller whose identity `FILE` this is (an enclave that enforces a caller policy): a session opened at the first call, then a MAC on each; the cost of authentication is then part of each call")
	signEach := c.Bool("sign-each-call", false, "with --identity: sign each call with the identity instead of opening a session")
	l.register(c.FlagSet)
	if err := c.parse(args); err != nil {
		return err
	}
	if err := l.validate(c.FlagSet); err != nil {
		return err
	}
	if _, err := target.Parse(*addr); err != nil {
		return usagef("--target: %v", err)
	}
	if *signEach && *identity == "" {
		return usagef("--sign-each-call needs --identity")
	}
	extra, err := identityDialOptions(*identity, *signEach)
	if err != nil {
		return err
	}
	dial, err := bench.GRPCDialer(*addr, l.work, extra...)
	if err != nil {
		return usagef("%v", err)
	}
	stopProfile, err := l.profile()
	if err != nil {
		return err
	}
	res, err := bench.Run(ctx, l.cfg, dial, bench.Options{
		Name: *name, Target: *addr, Workload: l.work.String(), Progress: progress(c.IO), WatchPIDs: l.watch,
	})
	if perr := stopProfile(); err == nil && perr != nil {
		err = fmt.Errorf("--cpu-profile: %w", perr)
	}
	if err != nil {
		return err
	}
	if err := l.writeOutputs(c.IO, res, res.WriteText, "nitrosign bench: "+res.Name, []*bench.Result{res}); err != nil {
		return err
	}
	return failedAll([]*bench.Result{res})
}

// targetList collects compare's --target NAME=ADDRESS.
type targetList []bench.Target

// identityFlag collects --identity NAME=FILE.
type identityFlag map[string]string

func (f identityFlag) String() string { return fmt.Sprint(len(f)) + " identities" }

func (f identityFlag) Set(s string) error {
	name, file, ok := strings.Cut(s, "=")
	if !ok || name == "" || file == "" {
		return errors.New("want NAME=FILE: the target's name and an identity file")
	}
	if _, dup := f[name]; dup {
		return fmt.Errorf("two identities for target %q", name)
	}
	f[name] = file
	return nil
}

// identityDialOptions authenticates a connection's Sign calls as the
// identity in file (none when file is empty): with a session shared by
// every connection the options dial, or signing each call.
func identityDialOptions(file string, signEachCall bool) ([]grpc.DialOption, error) {
	if file == "" {
		return nil, nil
	}
	id, err := callauth.LoadIdentity(file)
	if err != nil {
		return nil, err
	}
	return []grpc.DialOption{grpc.WithUnaryInterceptor(callauth.ClientInterceptor(id, signEachCall))}, nil
}

// nameSet collects a repeatable flag of target names.
type nameSet map[string]bool

func (f nameSet) String() string { return fmt.Sprint(len(f)) + " names" }

func (f nameSet) Set(s string) error {
	if s == "" {
		return errors.New("empty target name")
	}
	f[s] = true
	return nil
}

func (t *targetList) String() string { return fmt.Sprint(len(*t)) + " targets" }

func (t *targetList) Set(s string) error {
	name, addr, ok := strings.Cut(s, "=")
	if !ok {
		name, addr = s, s
	}
	if name == "" {
		return errors.New("empty name: want NAME=ADDRESS")
	}
	if _, err := target.Parse(addr); err != nil {
		return err
	}
	*t = append(*t, bench.Target{Name: name, Addr: addr})
	return nil
}

const compareUsage = `Usage: nitrosign compare --target NAME=ADDRESS --target NAME=ADDRESS ... [flags]

Runs the same workload against several targets in interleaved rounds
(A B A B ...), so that noise on a shared machine hits every target alike.
Reports each target (its rounds merged: throughput, latency percentiles,
errors), then every other target against the first: the throughput ratio
and the latency it adds at p50, p90 and p99. --chart draws the latency
percentile curves of all targets on one self-contained SVG or HTML chart.

Each round runs the whole load shape (warm-up included) against each
target in turn. The load flags are those of "nitrosign bench".

Examples:
  # What does the proxy cost over calling the enclave directly?
  nitrosign compare --target direct=vsock://16:5005 --target proxy=tcp://127.0.0.1:8443 \
      --concurrency 64 --connections 2 --duration 5s --rounds 3 --chart proxy.svg

  # What does caller authentication cost? The same enclave: anonymous calls,
  # calls in a session, calls each signed
  nitrosign compare --rpc sign --key-type ecc --target anonymous=vsock://1:5005 \
      --target session=vsock://1:5005 --target signed=vsock://1:5005 \
      --identity session=alice.key --identity signed=alice.key --sign-each-call signed \
      --concurrency 1 --duration 5s --rounds 3

  # At 1 call in flight: the latency the proxy adds
  nitrosign compare --target direct=tcp://127.0.0.1:7001 --target proxy=tcp://127.0.0.1:7002 \
      --concurrency 1 --duration 5s --rounds 3

  # Short-lived clients: our pooled proxy against socat, a fresh connection every 10 calls
  nitrosign compare --target proxy=tcp://127.0.0.1:7002 --target socat=tcp://127.0.0.1:7003 \
      --concurrency 64 --connect-every 10 --duration 5s --rounds 3 --json churn.json
`

func runCompare(ctx context.Context, c *cmd, args []string) error {
	var l loadFlags
	var targets targetList
	c.Var(&targets, "target", "a target as `NAME=ADDRESS` (vsock://CID:PORT or tcp://HOST:PORT); repeat for each, the first is the baseline")
	rounds := c.Int("rounds", 3, "rounds per target, interleaved")
	identities := identityFlag{}
	c.Var(identities, "identity", "authenticate the calls to target NAME as the caller whose identity FILE this is, as `NAME=FILE` (repeatable; the other targets' calls go anonymous), in a session: compare a call with and without authentication")
	signEach := nameSet{}
	c.Var(signEach, "sign-each-call", "sign each call to target `NAME` (given an --identity) with the identity instead of opening a session (repeatable)")
	pause := c.Duration("pause", 200*time.Millisecond, "pause between two runs, so closed connections are torn down")
	l.register(c.FlagSet)
	if err := c.parse(args); err != nil {
		return err
	}
	if len(targets) < 2 {
		return usagef("give at least two --target NAME=ADDRESS to compare (for one, use nitrosign bench)")
	}
	if *rounds < 1 || *rounds > 1000 {
		return usagef("--rounds %d: must be between 1 and 1000", *rounds)
	}
	if *pause < 0 {
		return usagef("--pause must not be negative")
	}
	if err := l.validate(c.FlagSet); err != nil {
		return err
	}
	seen := map[string]bool{}
	for i := range targets {
		t := &targets[i]
		if seen[t.Name] {
			return usagef("two targets are named %q: give each NAME=ADDRESS a distinct name", t.Name)
		}
		seen[t.Name] = true
		extra, err := identityDialOptions(identities[t.Name], signEach[t.Name])
		if err != nil {
			return err
		}
		dial, err := bench.GRPCDialer(t.Addr, l.work, extra...)
		if err != nil {
			return usagef("%v", err)
		}
		t.Dial = dial
	}
	for name := range signEach {
		if _, ok := identities[name]; !ok {
			return usagef("--sign-each-call %s: target %q has no --identity", name, name)
		}
	}
	for name := range identities {
		if !seen[name] {
			return usagef("--identity %s=...: no target is named %q", name, name)
		}
	}
	stopProfile, err := l.profile()
	if err != nil {
		return err
	}
	cmp, err := bench.Compare(ctx, l.cfg, targets, bench.CompareOptions{
		Rounds: *rounds, Workload: l.work.String(), Progress: progress(c.IO), WatchPIDs: l.watch, Pause: *pause,
	})
	if perr := stopProfile(); err == nil && perr != nil {
		err = fmt.Errorf("--cpu-profile: %w", perr)
	}
	if err != nil {
		return err
	}
	names := make([]string, len(cmp.Results))
	for i, r := range cmp.Results {
		names[i] = r.Name
	}
	title := "nitrosign compare: " + strings.Join(names, " vs ")
	if err := l.writeOutputs(c.IO, cmp, cmp.WriteText, title, cmp.Results); err != nil {
		return err
	}
	return failedAll(cmp.Results)
}
