package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"

	"github.com/nitrosign/nitrosign/internal/callauth"
)

// ---- identity create | show -------------------------------------------------

const identityUsage = `Usage: nitrosign identity create --out FILE [--type ed25519|p256] [--output text|json]
       nitrosign identity show --identity FILE [--output text|json]

A caller identity is the private key with which this client signs its Sign
and key administration calls (--identity FILE on any command that calls a
server). The enclave checks each signature itself, against the public keys
of its caller policy, so neither the host proxy nor the parent instance
can sign in a caller's name, change a call, or play one again.

create  generates a new identity (Ed25519 by default, or ECDSA P-256) and
        writes its private key to FILE (PEM, PKCS#8, mode 0600; an existing
        file is never overwritten), then prints its key id and public key.
        Put the public key in the enclave's caller policy
        (deploy/policy.json, "public_key"; the policy line is printed too).
show    prints an identity file's type, key id and public key.

Keep FILE private: whoever can read it can sign as this caller. The key is
never printed.

Examples:
  nitrosign identity create --out payments.pem
  nitrosign identity create --out admin.pem --type p256 --output json
  nitrosign identity show --identity payments.pem
  nitrosign sign --identity payments.pem --key-type ecc --message hello
`

// identityJSON is an identity in create's and show's JSON output.
type identityJSON struct {
	File         string `json:"file"`
	Type         string `json:"type"`
	KeyID        string `json:"key_id"`
	PublicKeyPEM string `json:"public_key_pem"`
}

func runIdentity(_ context.Context, c *cmd, args []string) error {
	if len(args) == 0 {
		return usagef("identity needs a subcommand: create or show (see nitrosign identity -h)")
	}
	out := c.String("out", "", "create: write the new identity's private key to `FILE` (never overwritten)")
	typ := c.String("type", callauth.TypeEd25519, "create: key type, ed25519 or p256 (ECDSA P-256)")
	file := c.String("identity", "", "show: the identity `FILE`")
	output := c.String("output", "text", "output format: text or json")
	verb := args[0]
	switch verb {
	case "-h", "-help", "--help", "help":
		c.Usage()
		return flag.ErrHelp
	case "create", "show":
	default:
		return usagef("identity %q: want create or show (see nitrosign identity -h)", verb)
	}
	if err := c.parse(args[1:]); err != nil {
		return err
	}
	set := map[string]bool{}
	c.Visit(func(f *flag.Flag) { set[f.Name] = true })
	switch {
	case *output != "text" && *output != "json":
		return usagef("--output %q: want text or json", *output)
	case verb == "create" && *out == "":
		return usagef("identity create needs --out FILE, where the private key goes")
	case verb == "create" && set["identity"]:
		return usagef("--identity is for identity show; identity create writes --out")
	case verb == "create" && *typ != callauth.TypeEd25519 && *typ != callauth.TypeP256:
		return usagef("--type %q: want ed25519 or p256", *typ)
	case verb == "show" && *file == "":
		return usagef("identity show needs --identity FILE")
	case verb == "show" && (set["out"] || set["type"]):
		return usagef("--out and --type are for identity create")
	}

	var id *callauth.Identity
	path := *file
	if verb == "create" {
		var err error
		if id, err = callauth.NewIdentity(*typ); err != nil {
			return err
		}
		path = *out
		if err := id.Save(path); errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w. Choose another --out, or move the file away first: it may be the only copy of a caller's key", err)
		} else if err != nil {
			return err
		}
	} else {
		var err error
		if id, err = callauth.LoadIdentity(path); err != nil {
			return err
		}
	}
	j := identityJSON{File: path, Type: id.Type(), KeyID: id.KeyID(), PublicKeyPEM: string(id.PublicKeyPEM())}
	if *output == "json" {
		return printJSON(c.Stdout, j)
	}
	printIdentity(c.Stdout, verb, j)
	return nil
}

func printIdentity(w io.Writer, verb string, j identityJSON) {
	if verb == "create" {
		fmt.Fprintf(w, "new caller identity written to %s (keep it private: it signs as this caller)\n", j.File)
	} else {
		fmt.Fprintf(w, "identity  %s\n", j.File)
	}
	fmt.Fprintf(w, "type      %s\n", j.Type)
	fmt.Fprintf(w, "key id    %s\n", j.KeyID)
	fmt.Fprintf(w, "public key, for the enclave's caller policy:\n%s", j.PublicKeyPEM)
	// The PEM as a JSON string, ready for the policy file.
	pemJSON, _ := json.Marshal(j.PublicKeyPEM) // a string always marshals
	fmt.Fprintf(w, "policy    \"public_key\": %s\n", pemJSON)
}
