// Package cli implements the nitrosign command: subcommands that talk to
// either end of the system (the enclave over vsock, or the host proxy over
// TCP) and print text or JSON. Run is the whole program, so tests drive it
// exactly as a user does.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"github.com/nitrosign/nitrosign/host/client"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/target"
	"github.com/nitrosign/nitrosign/internal/tlsconfig"
)

// Exit statuses.
const (
	ExitOK      = 0
	ExitFailure = 1 // the operation failed (RPC error, invalid signature)
	ExitUsage   = 2 // bad flags or arguments
)

// DefaultTarget is the host proxy on this machine.
const DefaultTarget = "tcp://127.0.0.1:8443"

// IO is where a command reads and writes.
type IO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
}

// command is one subcommand: its line in the usage text, the text of its
// -h, the shared flags it takes and its body.
type command struct {
	name, summary, usage string
	needs                needs
	run                  func(ctx context.Context, c *cmd, args []string) error
}

// commands are all the subcommands, in the order the usage text lists them.
var commands = []command{
	{"echo", "round-trip a payload and print the latency", echoUsage, server, runEcho},
	{"keys", "list the signing keys", keysUsage, server, runKeys},
	{"pubkey", "print a public key as PEM", pubkeyUsage, server | keyed, runPubkey},
	{"sign", "sign a message or digest", signUsage, server | keyed, runSign},
	{"verify", "verify a signature locally (exit 0 only when valid)", verifyUsage, server | keyed, runVerify},
	{"attest", "fetch (or read) an attestation document and verify it", attestUsage, server, runAttest},
	{"keyset", "on the parent: request a new sealed keyset, or show its header", keysetUsage, 0, runKeyset},
	{"identity", "create or show a caller identity (the key that signs calls)", identityUsage, 0, runIdentity},
	{"audit", "verify an audit log: its chains, hashes and signed heads", auditUsage, 0, runAudit},
	{"bench", "load-test one target: throughput and latency percentiles", benchUsage, 0, runBench},
	{"compare", "benchmark several targets in interleaved rounds and compare them", compareUsage, 0, runCompare},
}

const topUsage = `nitrosign: client of the nitrosign enclave signing service.

Usage:
  nitrosign <command> [flags]

Commands:
%s
Every command takes --target (vsock://CID:PORT for the enclave directly,
tcp://HOST:PORT for the host proxy; default %s), --timeout,
--output text|json and --identity FILE (the caller identity that signs
Sign and key administration calls: see nitrosign identity -h).
"nitrosign <command> -h" shows its flags and examples.
`

func usage(w io.Writer) {
	var b strings.Builder
	for _, c := range commands {
		fmt.Fprintf(&b, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, topUsage, b.String(), DefaultTarget)
}

// usageError is a mistake in flags or arguments (exit 2).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// errInvalid marks a signature that did not verify (exit 1, no usage).
var errInvalid = errors.New("signature is NOT valid")

// Run runs the program with args (without the program name) and returns
// its exit status.
func Run(ctx context.Context, io IO, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(io.Stdout)
		if len(args) == 0 {
			return ExitUsage
		}
		return ExitOK
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, newCmd(io, c), args[1:])
		var ue usageError
		switch {
		case err == nil:
			return ExitOK
		case errors.Is(err, flag.ErrHelp):
			return ExitOK
		case errors.As(err, &ue):
			fmt.Fprintf(io.Stderr, "nitrosign %s: %v\n", c.name, err)
			return ExitUsage
		default:
			fmt.Fprintf(io.Stderr, "nitrosign %s: %s\n", c.name, describe(err))
			return ExitFailure
		}
	}
	fmt.Fprintf(io.Stderr, "nitrosign: unknown command %q\n\n", args[0])
	usage(io.Stderr)
	return ExitUsage
}

// describe renders an error for a person: a gRPC status as "Code: message".
func describe(err error) string {
	if st, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", st.Code(), st.Message())
	}
	return err.Error()
}

// needs are the shared flags a command takes.
type needs uint8

const (
	server needs = 1 << iota // --target, --timeout, --output, TLS: it calls one server
	keyed                    // --key-type, --key-id: it selects a key
)

// cmd is the preamble every command shares: its flag set, whose -h prints
// the command's usage text, with the shared flags it needs; parse parses
// and checks them, connect dials the target within --timeout.
type cmd struct {
	*flag.FlagSet
	IO
	needs needs
	common
	keyFlags
}

func newCmd(io IO, c command) *cmd {
	fs := flag.NewFlagSet("nitrosign "+c.name, flag.ContinueOnError)
	fs.SetOutput(io.Stderr)
	fs.Usage = func() {
		fmt.Fprint(io.Stderr, c.usage)
		fmt.Fprintln(io.Stderr, "\nFlags:")
		fs.PrintDefaults()
	}
	x := &cmd{FlagSet: fs, IO: io, needs: c.needs}
	if c.needs&server != 0 {
		x.common.register(fs)
	}
	if c.needs&keyed != 0 {
		x.keyFlags.register(fs)
	}
	return x
}

// parse parses args, rejects positional arguments and validates the
// shared flags.
func (c *cmd) parse(args []string) error {
	if err := c.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	if c.NArg() > 0 {
		return usagef("unexpected argument %q (see -h)", c.Arg(0))
	}
	if c.needs&server == 0 {
		return nil
	}
	return c.validate()
}

// connect starts the command's deadline (--timeout) and dials the target
// within it; done closes the connection and ends the deadline.
func (c *cmd) connect(ctx context.Context) (_ context.Context, _ *client.Client, done func(), err error) {
	tc, err := c.tls.TLSConfig()
	if err != nil {
		return nil, nil, nil, err
	}
	var id *callauth.Identity
	if c.identity != "" {
		// LoadIdentity's errors name the file and never quote it.
		if id, err = callauth.LoadIdentity(c.identity); err != nil {
			return nil, nil, nil, fmt.Errorf("--identity: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	// A TLS mismatch would otherwise show only as "cannot reach" after the
	// whole --timeout: find it at once.
	if t, perr := target.Parse(c.target); perr == nil {
		if err := precheckTLS(ctx, t, tc); err != nil {
			cancel()
			return nil, nil, nil, err
		}
	}
	// One call per command: signed, rather than a session opened for it.
	cl, err := client.Dial(ctx, c.target, client.Options{TLS: tc, Identity: id, SignEachCall: true})
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return ctx, cl, func() { _ = cl.Close(); cancel() }, nil
}

// common holds the flags of a command that calls one server.
type common struct {
	target  string
	timeout time.Duration
	output  string
	// tls: --tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, for
	// a proxy serving TLS or mutual TLS (its --tls-cert, --client-ca).
	tls tlsconfig.ClientConfig
	// insecure allows plaintext to a tcp:// target beyond loopback.
	insecure bool
	// identity is the caller identity file that signs the calls the
	// enclave authenticates (Sign, KeyAdminService); "" for none.
	identity string
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.target, "target", DefaultTarget, "server: vsock://CID:PORT (enclave) or tcp://HOST:PORT (proxy)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Second, "deadline for the whole command, connection included")
	fs.StringVar(&c.output, "output", "text", "output format: text or json")
	c.tls.RegisterFlags(fs)
	fs.StringVar(&c.identity, "identity", "", "sign Sign and key administration calls as the caller whose private key is in `FILE` (nitrosign identity create); the enclave checks the signature against its caller policy")
	fs.BoolVar(&c.insecure, "insecure", false, "allow plaintext to a tcp:// target that is not on loopback (messages and signatures cross the network in the clear)")
}

func (c *common) validate() error {
	if c.output != "text" && c.output != "json" {
		return usagef("--output %q: want text or json", c.output)
	}
	if c.timeout <= 0 {
		return usagef("--timeout must be positive")
	}
	if err := c.tls.Validate(); err != nil {
		return usagef("%v", err)
	}
	if c.tls.On() && strings.HasPrefix(c.target, "vsock://") {
		return usagef("TLS flags are for the proxy (tcp://HOST:PORT); the enclave's vsock port is plaintext")
	}
	if t, err := target.Parse(c.target); err == nil && t.Scheme == target.TCP && !c.tls.On() && !c.insecure && !loopbackHost(t.HostPort) {
		return usagef("--target %s is not on loopback: use --tls (with --tls-ca/--tls-cert as the proxy requires), or --insecure to send in the clear", c.target)
	}
	return nil
}

// loopbackHost reports whether hostPort names this machine: localhost or a
// loopback IP. Other names are not resolved: they count as remote.
func loopbackHost(hostPort string) bool {
	host, _, err := net.SplitHostPort(hostPort)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// readInput returns the bytes of --message, --in FILE ("-" is stdin), or
// stdin when neither is given.
func readInput(io IO, message string, messageSet bool, in string) ([]byte, error) {
	switch {
	case messageSet && in != "":
		return nil, usagef("give either --message or --in, not both")
	case messageSet:
		return []byte(message), nil
	case in != "" && in != "-":
		b, err := os.ReadFile(in)
		if err != nil {
			return nil, fmt.Errorf("read message: %w", err)
		}
		return b, nil
	default:
		// 64 KiB is far above what Sign takes (4096 RAW), yet bounded.
		b, err := readAllLimit(io.Stdin, 1<<16)
		if err != nil {
			return nil, fmt.Errorf("read message from stdin: %w", err)
		}
		return b, nil
	}
}

func readAllLimit(r io.Reader, limit int64) ([]byte, error) {
	if r == nil {
		return nil, nil
	}
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("input larger than %d bytes", limit)
	}
	return b, nil
}
