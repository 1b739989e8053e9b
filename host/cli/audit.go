package cli

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/nitrosign/nitrosign/host/auditverify"
	"github.com/nitrosign/nitrosign/internal/auditfmt"
)

// ---- audit verify -----------------------------------------------------------

const auditUsage = `Usage: nitrosign audit verify [--file PATH] [--pcrs-file F [--pin-pcrs LIST] | --pcr N=HEX ...]
                              [--dev-trust-root ROOT.pem] [--allow-debug] [--output text|json]

Verifies the audit trail of signing decisions that nitrosign-proxy stores
(--audit-file; the enclave ships it, see --enclave-audit-port). It needs
neither the enclave nor the proxy: only the file.

For each chain (one per enclave start) it checks the genesis' attestation
document (chained to the AWS Nitro Enclaves root, or to --dev-trust-root,
at the document's own time; the PCRs given; no debug-mode enclave unless
--allow-debug), that the document's public_key is the chain's audit key,
every entry's hash, every prev link and seq, and every head's signature;
and that each new chain names, as its previous head, a head earlier in the
file, so that no chain between was removed.

Each fault is reported with its line number and kind:
  removed        seq gap, or prev not the hash of the entry before
  reordered      an entry after a later one of its chain
  edited         hash does not match the entry's content
  not_canonical  the line was reformatted
  forged_head    a head's signature is not the audit key's
  attestation    the genesis' document does not verify (or not the PCRs given)
  key_mismatch   the document does not attest the chain's audit key
  no_genesis     a chain whose start is not in the file
  gap            a chain names a previous head that is not in the file
  duplicate, syntax
and, as warnings: unsigned (entries after a chain's last head: the enclave
is running, or stopped before its last head) and unlinked (a chain that
names no previous head although others precede it).

Exit status 0 when the whole file verifies (warnings allowed), 1 when it
does not or cannot be read, 2 for bad flags. What the file alone cannot
show: entries cut from its end together with their heads; compare the
last head printed with one you keep elsewhere (the proxy's log with
--audit-log-decisions).

Examples:
  sudo nitrosign audit verify --pcrs-file nitrosign-enclave.pcrs.json
  sudo nitrosign audit verify --pcrs-file nitrosign-enclave.pcrs.json --pin-pcrs 8
  nitrosign audit verify --file ./audit.jsonl --output json
  nitrosign audit verify --file ./dev-audit.jsonl --dev-trust-root dev-root.pem   # development (simulated NSM)
`

func runAudit(_ context.Context, c *cmd, args []string) error {
	if len(args) == 0 {
		return usagef("audit needs a subcommand: verify (see nitrosign audit -h)")
	}
	verb := args[0]
	var a attestFlags
	file := c.String("file", auditfmt.DefaultFile, "the audit `file` (nitrosign-proxy --audit-file)")
	output := c.String("output", "text", "output format: text or json")
	c.Var(&a.pcrs, "pcr", "expected PCR of every chain's enclave as INDEX=HEX (repeatable)")
	c.StringVar(&a.pcrsFile, "pcrs-file", "", `expected PCRs from a JSON file: {"PCR0":"hex",...} as nitro-cli build-enclave prints, or {"0":"hex",...}`)
	c.StringVar(&a.pinPCRs, "pin-pcrs", "", "pin only these PCRs of --pcrs-file, e.g. 8 (the EIF signing certificate) or 0,1,2")
	devRoot := c.String("dev-trust-root", "", "DEVELOPMENT ONLY: trust this root certificate (`PEM`) instead of the AWS Nitro Enclaves root: a simulated NSM's")
	c.BoolVar(&a.allowDebug, "allow-debug", false, "accept all-zero PCRs (debug-mode enclaves, whose memory the host can read)")
	switch verb {
	case "-h", "-help", "--help", "help":
		c.Usage()
		return flag.ErrHelp
	case "verify":
	default:
		return usagef("audit %q: want verify (see nitrosign audit -h)", verb)
	}
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	if *output != "text" && *output != "json" {
		return usagef("--output %q: want text or json", *output)
	}
	if *file == "" {
		return usagef("--file is empty")
	}
	vo, err := a.options()
	if err != nil {
		return err
	}
	if *devRoot != "" {
		root, err := readRootPEM(*devRoot)
		if err != nil {
			return usagef("--dev-trust-root: %v", err)
		}
		vo.Root = root
	}
	rep, err := auditverify.VerifyFile(*file, auditverify.Options{Attestation: vo})
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%w (run it as root: the file is in nitrosign-proxy's state directory)", err)
		}
		return err
	}
	if *output == "json" {
		if err := printJSON(c.Stdout, struct {
			File string `json:"file"`
			*auditverify.Report
		}{*file, rep}); err != nil {
			return err
		}
	} else {
		printAuditReport(c.Stdout, *file, rep)
	}
	if !rep.OK {
		return fmt.Errorf("%s does NOT verify: %d error(s), %d warning(s)", *file, rep.Errors, rep.Warnings)
	}
	return nil
}

// readRootPEM reads the first CERTIFICATE block of a PEM file (a
// development root file may hold its key too).
func readRootPEM(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return nil, fmt.Errorf("%s: no PEM CERTIFICATE block", path)
		}
		if blk.Type == "CERTIFICATE" {
			return x509.ParseCertificate(blk.Bytes)
		}
	}
}

func printAuditReport(w io.Writer, file string, rep *auditverify.Report) {
	fmt.Fprintf(w, "audit file %s: %d lines, %d chain(s)\n", file, rep.Lines, len(rep.Chains))
	for _, c := range rep.Chains {
		fmt.Fprintf(w, "\nchain %s (lines %d-%d)\n", c.ID, c.FirstLine, c.LastLine)
		fmt.Fprintf(w, "  entries:   %d (seq up to %d): %d decisions (%d allowed, %d denied), %d heads\n",
			c.Entries, c.LastSeq, c.Decisions, c.Allowed, c.Denied, c.Heads)
		if c.Started != "" {
			fmt.Fprintf(w, "  started:   %s\n", c.Started)
		}
		switch {
		case c.Attested:
			fmt.Fprintf(w, "  attested:  yes (module %s)\n", c.ModuleID)
		case c.Started != "":
			fmt.Fprintln(w, "  attested:  NO")
		default:
			fmt.Fprintln(w, "  attested:  no genesis in the file")
		}
		if c.PreviousHead != nil {
			fmt.Fprintf(w, "  follows:   %s\n", c.PreviousHead)
		} else if c.Started != "" {
			fmt.Fprintln(w, "  follows:   nothing (previous_head null)")
		}
		if c.LastHead != nil {
			fmt.Fprintf(w, "  last head: %s\n", c.LastHead)
		}
		if c.Unsigned > 0 {
			fmt.Fprintf(w, "  unsigned:  %d entries after the last head\n", c.Unsigned)
		}
	}
	if len(rep.Faults) > 0 {
		fmt.Fprintln(w)
		for _, f := range rep.Faults {
			fmt.Fprintln(w, f.String())
		}
		if rep.FaultsOmitted > 0 {
			fmt.Fprintf(w, "... and %d more\n", rep.FaultsOmitted)
		}
	}
	fmt.Fprintln(w)
	if rep.OK {
		fmt.Fprintf(w, "OK: the file verifies (%d warning(s))\n", rep.Warnings)
	} else {
		fmt.Fprintf(w, "FAILED: %d error(s), %d warning(s)\n", rep.Errors, rep.Warnings)
	}
}
