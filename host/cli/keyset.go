package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/nitrosign/nitrosign/host/keystore/keyfile"
)

// ---- keyset init | show ---------------------------------------------------

const keysetUsage = `Usage: nitrosign keyset init [--file PATH]
       nitrosign keyset show [--file PATH] [--output text|json]

Looks after the sealed keyset nitrosign-proxy keeps on this parent instance
for enclaves run with --key-mode sealed (docs/SEALING.md): the file of
nitrosign-proxy --keyset-file. Run it on the parent, as root: the file is in
the proxy's state directory. It needs neither KMS nor the enclave, and
never sees a key: the keys are sealed.

init  asks for a new keyset by creating PATH.init. The next enclave start,
      or a running enclave within its next retry, then creates a new keyset,
      seals it with AWS KMS and has nitrosign-proxy store it at PATH, which
      removes PATH.init. Refused when PATH or PATH.prev exists, so that no
      keyset is ever replaced by accident.
show  prints the header of PATH, and of PATH.prev (the keyset it replaced
      last) if there is one: format, KMS key ARN, key ids, when it was
      created and sealed, the file's size and SHA-256. Exit status 1 when
      PATH is missing or does not parse.

Examples:
  sudo nitrosign keyset init
  sudo nitrosign keyset show
  nitrosign keyset show --file ./keyset.sealed --output json
`

func runKeyset(_ context.Context, c *cmd, args []string) error {
	if len(args) == 0 {
		return usagef("keyset needs a subcommand: init or show (see nitrosign keyset -h)")
	}
	file := c.String("file", keyfile.DefaultPath, "the sealed keyset `file` (nitrosign-proxy --keyset-file)")
	output := c.String("output", "text", "show: output format, text or json")
	verb := args[0]
	switch verb {
	case "-h", "-help", "--help", "help":
		c.Usage()
		return flag.ErrHelp
	case "init", "show":
	default:
		return usagef("keyset %q: want init or show (see nitrosign keyset -h)", verb)
	}
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	if err := keyfile.ValidatePath(*file); err != nil {
		return usagef("--file: %v", err)
	}
	if *output != "text" && *output != "json" {
		return usagef("--output %q: want text or json", *output)
	}
	if verb == "init" {
		if *output != "text" {
			return usagef("--output is for keyset show")
		}
		return keysetInit(c.Stdout, *file)
	}
	return keysetShow(c.Stdout, *file, *output)
}

func keysetInit(w io.Writer, path string) error {
	created, err := keyfile.RequestInit(path, time.Now())
	if errors.Is(err, keyfile.ErrExists) {
		return fmt.Errorf("%w. To start over on purpose, move %s and %s away first, and keep them: they are the only copies of the keys", err, path, keyfile.PrevPath(path))
	}
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("%w (run it as root: the directory is nitrosign-proxy's)", err)
	}
	if err != nil {
		return err
	}
	marker := keyfile.InitPath(path)
	if created {
		fmt.Fprintf(w, "new keyset requested: %s created.\n", marker)
	} else {
		fmt.Fprintf(w, "a new keyset was requested already: %s exists.\n", marker)
	}
	fmt.Fprintf(w, `
What happens next: the next enclave start (nitrosign-enclave --key-mode sealed),
or the running enclave within its next retry, creates a new keyset, seals it
with AWS KMS and has nitrosign-proxy store it at
  %s
and the proxy removes the request. See it happen with
  journalctl -u nitrosign-proxy -u nitrosign-enclave
  nitrosign keyset show --file %s
To cancel before then: rm %s
`, path, path, marker)
	return nil
}

// keysetJSON is a keyset file in show's JSON output.
type keysetJSON struct {
	Path      string   `json:"path"`
	Size      int64    `json:"size_bytes"`
	SHA256    string   `json:"sha256"`
	Format    int      `json:"format,omitempty"`
	KMSKeyARN string   `json:"kms_key_arn,omitempty"`
	KeyIDs    []string `json:"key_ids,omitempty"`
	Created   string   `json:"created,omitempty"`
	Sealed    string   `json:"sealed,omitempty"`
	Error     string   `json:"error,omitempty"`
}

// inspect reads one keyset file: nil when there is none; a file that does
// not parse or cannot be read has Error set.
func inspect(path string) (*keysetJSON, error) {
	info, err := keyfile.Inspect(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			err = fmt.Errorf("%w (run it as root: the directory is nitrosign-proxy's)", err)
		}
		return &keysetJSON{Path: path, Error: err.Error()}, err
	}
	j := &keysetJSON{Path: path, Size: info.Size, SHA256: info.SHA256}
	if info.ParseErr != nil {
		j.Error = info.ParseErr.Error()
		return j, fmt.Errorf("%s does not parse: %w", path, info.ParseErr)
	}
	h := info.Header
	j.Format, j.KMSKeyARN, j.KeyIDs = h.Format, h.KMSKeyARN, h.KeyIDs
	j.Created, j.Sealed = h.Created.UTC().Format(time.RFC3339), h.Sealed.UTC().Format(time.RFC3339)
	return j, nil
}

func keysetShow(w io.Writer, path, output string) error {
	cur, curErr := inspect(path)
	prev, _ := inspect(keyfile.PrevPath(path))
	init := false
	if cur == nil {
		_, err := os.Lstat(keyfile.InitPath(path))
		init = err == nil
	}
	if output == "json" {
		if err := printJSON(w, map[string]any{"keyset": cur, "previous": prev, "init_requested": init}); err != nil {
			return err
		}
	} else {
		if cur == nil {
			fmt.Fprintf(w, "keyset    %s: none\n", path)
			if init {
				fmt.Fprintf(w, "          a new keyset is requested (%s): the next enclave start makes one\n", keyfile.InitPath(path))
			}
		} else {
			printKeyset(w, "keyset   ", cur)
		}
		if prev != nil {
			printKeyset(w, "previous ", prev)
		}
	}
	switch {
	case curErr != nil:
		return curErr
	case cur == nil && init:
		return fmt.Errorf("no keyset at %s yet: a new one is requested", path)
	case cur == nil && prev != nil:
		return fmt.Errorf("no keyset at %s: enclaves in sealed mode will not start; restore it from %s (mv) or a backup", path, keyfile.PrevPath(path))
	case cur == nil:
		return fmt.Errorf("no keyset at %s: enclaves in sealed mode will not start; restore it from a backup, or request a new one with nitrosign keyset init", path)
	}
	return nil
}

func printKeyset(w io.Writer, label string, k *keysetJSON) {
	fmt.Fprintf(w, "%s %s\n", label, k.Path)
	if k.Size > 0 || k.SHA256 != "" {
		if k.KMSKeyARN != "" {
			fmt.Fprintf(w, "  format    %d\n", k.Format)
			fmt.Fprintf(w, "  KMS key   %s\n", k.KMSKeyARN)
			fmt.Fprintf(w, "  key ids   %s\n", strings.Join(k.KeyIDs, "\n            "))
			fmt.Fprintf(w, "  created   %s\n", k.Created)
			fmt.Fprintf(w, "  sealed    %s\n", k.Sealed)
		}
		fmt.Fprintf(w, "  size      %d bytes\n", k.Size)
		fmt.Fprintf(w, "  SHA-256   %s\n", k.SHA256)
	}
	if k.Error != "" {
		fmt.Fprintf(w, "  ERROR     %s\n", k.Error)
	}
}
