// Command nitrosign-enclave is the signing service that runs inside an AWS
// Nitro Enclave. It listens only on AF_VSOCK, generates its RSA, ECC and
// Ed25519 keys at start-up (they never leave the process), and serves Echo,
// Signer, Attestation, grpc.health.v1 and reflection.
//
// Inside an enclave its flags are baked into Dockerfile.enclave's ENTRYPOINT,
// since nitro-cli run-enclave passes none, and so measured into the PCRs.
package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"go.uber.org/fx"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/nitrosign/nitrosign/enclave"
	"github.com/nitrosign/nitrosign/enclave/authz"
	"github.com/nitrosign/nitrosign/enclave/listener"
	"github.com/nitrosign/nitrosign/enclave/logship"
	"github.com/nitrosign/nitrosign/enclave/signer"
	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/logging"
	"github.com/nitrosign/nitrosign/internal/target"
)

const usage = `nitrosign-enclave: the enclave signing service (AF_VSOCK only).

Usage:
  nitrosign-enclave [flags]

Examples:
  # inside a Nitro Enclave (see Dockerfile.enclave)
  nitrosign-enclave --port 5005 --key-mode sealed \
      --kms-key-arn arn:aws:kms:eu-west-1:111122223333:key/0b5c5a3e-1f2d-4c6b-9a8e-7d6f5e4d3c2b
  # on a machine with vsock_loopback, for development
  nitrosign-enclave --cid 1 --port 5005 --dev-simulated-nsm --dev-allow-anonymous --log-format console
  # two development enclaves serving one keyset (behind one proxy)
  seed=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  nitrosign-enclave --cid 1 --port 5005 --dev-simulated-nsm --dev-key-seed "$seed" &
  nitrosign-enclave --cid 1 --port 5006 --dev-simulated-nsm --dev-key-seed "$seed" &

Flags:
`

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	c, err := parseFlags(args, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return 2
	}
	log, err := logging.New(c.Log, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "nitrosign-enclave: %v\n", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if c.LogShip != "" {
		// Every line from here on, start-up failures included, also goes
		// to the host (the proxy's --enclave-log-port), which logs it:
		// nothing else of a production enclave is readable.
		t, _ := target.Parse(c.LogShip) // validated
		ship, err := logship.New(logship.Config{Dial: t.Dial})
		if err != nil {
			log.Error("start-up failed", zap.Error(err))
			return 1
		}
		log = log.WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
			return zapcore.NewTee(core, ship.Core(zap.LevelEnablerFunc(core.Enabled)))
		}))
		defer func() {
			// The last lines (why the enclave stops) get a moment to
			// reach the host; the enclave ends after this either way. A
			// host never reached (nothing listens: development) gets a
			// few redials, not the whole wait.
			wait := shipFlushTimeout
			if !ship.Reached() {
				wait = shipFlushTimeout / 6
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			if err := ship.Close(ctx); err != nil {
				fmt.Fprintf(os.Stderr, "nitrosign-enclave: %v (%d lines dropped in all)\n", err, ship.Dropped())
			}
		}()
	}

	app := fx.New(enclave.VsockOptions(c, log))
	return runApp(app, log, c.Server.GracefulStopTimeout)
}

// kmsKeyARNEnv is the KMS key's environment variable: an image's ENV is
// part of the EIF, and so measured like its ENTRYPOINT.
const kmsKeyARNEnv = "NITROSIGN_KMS_KEY_ARN"

// shipFlushTimeout bounds the wait, at exit, for the last log lines to
// reach the host.
const shipFlushTimeout = 3 * time.Second

// parseFlags turns the command line (in an enclave: Dockerfile.enclave's
// ENTRYPOINT) into a validated Config. It prints what is wrong to stderr;
// -h prints the usage and returns flag.ErrHelp.
func parseFlags(args []string, stderr io.Writer) (enclave.Config, error) {
	fs := flag.NewFlagSet("nitrosign-enclave", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	var (
		c   = enclave.DefaultConfig()
		cid = cidFlag(listener.CIDAny)
	)
	fs.Var(&cid, "cid", `vsock context ID to bind: "any" (default) or a number, e.g. 1 for local loopback`)
	port := fs.Uint("port", uint(listener.DefaultPort), "vsock port to listen on (not 9000: nitro-cli's heartbeat)")
	fs.StringVar(&c.Signer.KeyMode, "key-mode", c.Signer.KeyMode, "where the keys come from: ephemeral (new keys at every start, never stored) or sealed (a keyset sealed with AWS KMS, kept by the host, unsealed only by an attested enclave: docs/SEALING.md)")
	fs.StringVar(&c.Keyset.KMSKeyARN, "kms-key-arn", os.Getenv(kmsKeyARNEnv), "sealed: the `ARN` of the KMS key the keyset is sealed under (arn:aws:kms:REGION:ACCOUNT:key/ID; its region is the KMS endpoint's); default $"+kmsKeyARNEnv+", which Dockerfile.enclave sets from its KMS_KEY_ARN build argument (measured into PCR2)")
	fs.StringVar(&c.Keyset.HostAddr, "keyset-host", c.Keyset.HostAddr, "sealed: the host's keyset service (nitrosign-proxy --enclave-host-port), vsock://CID:PORT or tcp://HOST:PORT")
	fs.StringVar(&c.Keyset.KMSProxy, "kms-proxy", c.Keyset.KMSProxy, "sealed: where KMS connections go: the parent's forwarder to kms.REGION.amazonaws.com:443 (nitrosign-proxy --kms-forward-port, or AWS's vsock-proxy); TLS runs end to end")
	fs.StringVar(&c.Keyset.KMSCAFile, "kms-ca-file", "", "sealed, TESTS: trust only the CA certificates in this PEM `file` for KMS instead of the compiled-in Amazon roots")
	fs.StringVar(&c.Keyset.KMSEndpoint, "kms-endpoint", "", "sealed: the KMS endpoint `URL` instead of https://kms.REGION.amazonaws.com (e.g. a FIPS endpoint)")
	fs.IntVar(&c.Signer.RSABits, "rsa-bits", c.Signer.RSABits, "RSA key size: 2048, 3072 or 4096")
	fs.StringVar(&c.Signer.ECCCurve, "ecc-curve", c.Signer.ECCCurve, "ECC curve: P-256 or P-384")
	fs.BoolVar(&c.Signer.Ed25519, "ed25519", c.Signer.Ed25519, "also generate an Ed25519 key")
	fs.DurationVar(&c.Server.GracefulStopTimeout, "graceful-timeout", c.Server.GracefulStopTimeout, "how long in-flight calls may finish after SIGTERM")
	// Limits (docs/RELIABILITY.md), with the server package's defaults.
	c.Server.Limits.RegisterFlags(fs, "connection")
	fs.StringVar(&c.Authz.PolicyFile, "policy", "", "the caller policy `file` (JSON: who may sign with which key, and administer keys; docs/AUTHZ.md): Dockerfile.enclave bakes deploy/policy.json in as /etc/nitrosign/policy.json, so it is measured, and attestation commits to it. Without one no caller may sign")
	fs.DurationVar(&c.Authz.MaxSkew, "auth-max-skew", authz.DefaultMaxSkew, "how far a signed call's timestamp may be from the enclave's clock, either way; nonces are remembered for twice that")
	fs.DurationVar(&c.Authz.SessionLifetime, "session-lifetime", callauth.DefaultSessionLifetime, "how long a caller's session (SessionService.OpenSession) is accepted, 1m to 24h")
	fs.BoolVar(&c.Authz.DevAllowAnonymous, "dev-allow-anonymous", false, "DEVELOPMENT ONLY: calls that carry no caller signature may sign and administer keys (signed calls are still checked against --policy). Needs --dev-simulated-nsm; refused where /dev/nsm exists")
	fs.BoolVar(&c.Attest.DevSimulatedNSM, "dev-simulated-nsm", false, "DEVELOPMENT ONLY: without /dev/nsm, attest with a simulated NSM whose documents chain to a throwaway dev root, never to AWS")
	fs.StringVar(&c.Attest.DevRootFile, "dev-simulated-nsm-root", "", "DEVELOPMENT ONLY: the simulated NSM issues from the root certificate and key in this PEM `file` (several simulated enclaves then chain to one root, which a test KMS trusts); needs --dev-simulated-nsm")
	// Read as text and decoded below: the flag package would print a
	// malformed value back, and the seed must never reach an output.
	var seedHex string
	seedGiven := false
	fs.Func("dev-key-seed", "DEVELOPMENT ONLY: derive every key from this 32-byte `seed` (64 hex characters) instead of generating it, so that enclaves given the same seed serve the same keyset (several enclaves behind one proxy); anyone who knows the seed has the keys. Needs --dev-simulated-nsm; refused where /dev/nsm exists", func(s string) error {
		seedHex, seedGiven = s, true
		return nil
	})
	fs.StringVar(&c.Log.Level, "log-level", c.Log.Level, "log level: debug, info, warn or error")
	fs.StringVar(&c.AuditShip, "audit-ship", c.AuditShip, "send the audit trail of signing decisions (hash-chained, heads signed with an attested key) to the host's receiver at this `address` (nitrosign-proxy --enclave-audit-port); a decision it cannot keep is refused; empty, DEVELOPMENT ONLY (needs --dev-simulated-nsm): no audit trail")
	fs.StringVar(&c.LogShip, "log-ship", c.LogShip, "also send every log line (JSON) to the host's receiver at this `address`, vsock://CID:PORT (the parent is CID 3; nitrosign-proxy --enclave-log-port) or tcp://HOST:PORT; never blocks: lines the host does not take in time are dropped and counted; empty: off")
	fs.StringVar(&c.Log.Format, "log-format", c.Log.Format, "log format: json or console")
	if err := fs.Parse(args); err != nil {
		return enclave.Config{}, err // flag printed it
	}
	fail := func(err error) (enclave.Config, error) {
		fmt.Fprintf(stderr, "nitrosign-enclave: %v\n", err)
		return enclave.Config{}, err
	}
	if fs.NArg() > 0 {
		return fail(fmt.Errorf("unexpected argument %q (flags only; see -h)", fs.Arg(0)))
	}
	if *port > 0xFFFFFFFF {
		return fail(fmt.Errorf("--port %d does not fit 32 bits", *port))
	}
	c.Listener = listener.Config{CID: uint32(cid), Port: uint32(*port)}
	if seedGiven {
		seed, err := hex.DecodeString(strings.TrimSpace(seedHex))
		if err != nil || len(seed) != signer.DevKeySeedSize {
			// Neither the value nor the decoder's error (it quotes the
			// offending character) is printed.
			return fail(fmt.Errorf("--dev-key-seed: want %d hex characters (%d bytes), got %d characters",
				2*signer.DevKeySeedSize, signer.DevKeySeedSize, len(strings.TrimSpace(seedHex))))
		}
		c.Signer.DevKeySeed = seed
	}
	if err := c.Validate(); err != nil {
		return fail(err)
	}
	return c, nil
}

// runApp starts app, waits for SIGINT/SIGTERM, and stops it within the
// graceful timeout plus a margin. It returns the exit status: 0 after a
// clean drain, 1 when start-up or shutdown failed.
func runApp(app *fx.App, log *zap.Logger, graceful time.Duration) int {
	if err := app.Err(); err != nil {
		log.Error("start-up failed", zap.String("error", logging.RootCause(err).Error()))
		return 1
	}
	startCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := app.Start(startCtx); err != nil {
		log.Error("start-up failed", zap.String("error", logging.RootCause(err).Error()))
		return 1
	}
	sig := <-app.Wait()
	log.Info("stopping", zap.String("signal", sig.Signal.String()))
	stopCtx, cancelStop := context.WithTimeout(context.Background(), graceful+5*time.Second)
	defer cancelStop()
	if err := app.Stop(stopCtx); err != nil {
		log.Error("shutdown failed", zap.Error(err))
		return 1
	}
	log.Info("stopped")
	return sig.ExitCode
}

// cidFlag parses "any" or a 32-bit number.
type cidFlag uint32

func (c *cidFlag) String() string {
	if uint32(*c) == listener.CIDAny {
		return "any"
	}
	return strconv.FormatUint(uint64(*c), 10)
}

func (c *cidFlag) Set(s string) error {
	if strings.EqualFold(s, "any") {
		*c = cidFlag(listener.CIDAny)
		return nil
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return fmt.Errorf(`want "any" or a number`)
	}
	*c = cidFlag(v)
	return nil
}
