// The acs-relay edge on Azure Container Apps.
//
// Container Apps ingress carries HTTP(S) and TCP, never UDP, so the tunnel runs over the TLS/TCP
// transport: HTTPS ingress (TLS terminated by Container Apps) for ACS on the edge's port 8080,
// and an additional external TCP port for the tunnel. Agents set transport = "tcp".
//
// An external additional TCP port needs an environment on a custom virtual network (Container
// Apps ingress docs, "Additional TCP ports"), so this template creates one: a workload-profiles
// environment whose infrastructure subnet (a /27 or larger) is delegated to
// Microsoft.App/environments.
//
// State (CA, tunnel certificate, agent registry) lives on an Azure Files share mounted with the
// image user's uid and owner-only modes, since the edge refuses private keys others can read.
// An init container creates it on first start (`init --if-missing`).
//
// The edge's routes and checks come from `edgeConfig` (TOML, see deploy/config/edge.example.toml),
// kept as a secret and mounted as a file, so every deployment carries them; listeners, state and
// drain come from the environment variables below.
//
// Probes: readiness is /healthz, not /readyz. On Container Apps a replica that is not ready gets
// no traffic on any port, the tunnel's included, and an edge becomes "ready" in /readyz terms only
// once an agent reaches it through that port. Without an agent the edge answers ACS with 503 and
// Retry-After itself, so routing to it early costs nothing.
//
// Redeploys: an edge given SIGTERM stops taking new exchanges and lets calls run for drainSeconds;
// Container Apps allows a grace period of at most 600 s, which this sets 30 s above the drain.

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Prefix for resource names.')
param name string = 'acs-relay'

@description('The edge image (deploy/docker/build.sh, pushed to your registry).')
param edgeImage string

@description('Registry server hosting the image, e.g. myregistry.azurecr.io.')
param registryServer string

@description('User-assigned identity (resource id) with AcrPull on the registry.')
param registryIdentityId string

@description('TCP port agents dial for the tunnel; also the edge tunnel port in the container.')
param tunnelPort int = 4433

@description('Edge replicas; they share the state share. One is enough to start.')
@minValue(1)
param replicas int = 1

@description('The edge configuration (TOML): routes, their checks and the checks\' settings. Required: an edge whose routes authenticate nobody refuses to start.')
@secure()
param edgeConfig string

@description('Address space of the environment\'s virtual network.')
param vnetAddressPrefix string = '10.50.0.0/16'

@description('Infrastructure subnet (a /27 or larger, delegated to Microsoft.App/environments). Container Apps\' ingress reaches the edge from it, so it is the edge\'s only trusted proxy.')
param infrastructureSubnetPrefix string = '10.50.0.0/27'

@description('How long a draining edge lets calls run, in seconds (the grace period is 30 s more; Container Apps allows 600).')
@minValue(30)
@maxValue(570)
param drainSeconds int = 570

var stateShareName = 'edge-state'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: take(replace('${name}state${uniqueString(resourceGroup().id)}', '-', ''), 24)
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
  }
}

resource fileService 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileService
  name: stateShareName
  properties: {
    shareQuota: 1
  }
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: '${name}-edge-vnet'
  location: location
  properties: {
    addressSpace: {
      addressPrefixes: [
        vnetAddressPrefix
      ]
    }
    subnets: [
      {
        name: 'infrastructure'
        properties: {
          addressPrefix: infrastructureSubnetPrefix
          delegations: [
            {
              name: 'containerapps'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
    ]
  }
}

resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: '${name}-edge-env'
  location: location
  properties: {
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
    // External: ACS and agents reach the edge from the internet; the tunnel's extra TCP port
    // needs the custom network.
    vnetConfiguration: {
      infrastructureSubnetId: vnet.properties.subnets[0].id
      internal: false
    }
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
  }
}

resource environmentStorage 'Microsoft.App/managedEnvironments/storages@2024-03-01' = {
  parent: environment
  name: 'edgestate'
  properties: {
    azureFile: {
      accountName: storage.name
      accountKey: storage.listKeys().keys[0].value
      shareName: share.name
      accessMode: 'ReadWrite'
    }
  }
}

resource edge 'Microsoft.App/containerApps@2024-03-01' = {
  name: '${name}-edge'
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${registryIdentityId}': {}
    }
  }
  properties: {
    managedEnvironmentId: environment.id
    workloadProfileName: 'Consumption'
    configuration: {
      activeRevisionsMode: 'Single'
      registries: [
        {
          server: registryServer
          identity: registryIdentityId
        }
      ]
      secrets: [
        {
          name: 'edge-config'
          value: edgeConfig
        }
      ]
      ingress: {
        external: true
        targetPort: 8080
        transport: 'http'
        allowInsecure: false
        // The tunnel: TCP only (Container Apps ingress carries no UDP).
        additionalPortMappings: [
          {
            external: true
            targetPort: tunnelPort
            exposedPort: tunnelPort
          }
        ]
      }
    }
    template: {
      terminationGracePeriodSeconds: drainSeconds + 30
      initContainers: [
        {
          name: 'init'
          image: edgeImage
          args: [
            'init'
            '--if-missing'
            '--name'
            '${name}-edge.${environment.properties.defaultDomain}'
          ]
          resources: {
            cpu: json('0.25')
            memory: '0.5Gi'
          }
          volumeMounts: [
            {
              volumeName: 'state'
              mountPath: '/var/lib/acs-relay'
            }
          ]
        }
      ]
      containers: [
        {
          name: 'edge'
          image: edgeImage
          args: [
            'run'
          ]
          env: [
            {
              name: 'RELAY_EDGE_CONFIG'
              value: '/etc/acs-relay/edge-config'
            }
            {
              name: 'RELAY_EDGE_DRAIN_TIMEOUT'
              value: '${drainSeconds}s'
            }
            {
              name: 'RELAY_EDGE_LISTEN'
              value: '0.0.0.0:8080'
            }
            {
              name: 'RELAY_EDGE_TUNNEL_LISTEN'
              value: '0.0.0.0:${tunnelPort}'
            }
            {
              // Container Apps' ingress sets X-Forwarded-*; it reaches the app from the
              // environment's infrastructure subnet, and nothing else may claim a client address.
              name: 'RELAY_EDGE_TRUSTED_PROXIES'
              value: infrastructureSubnetPrefix
            }
          ]
          // Sized from relay-bench: about half a core per 200 concurrent calls.
          resources: {
            cpu: json('1.0')
            memory: '2Gi'
          }
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 8080
              }
              periodSeconds: 10
            }
            {
              // Not /readyz: readiness here gates the tunnel port too (see the header).
              type: 'Readiness'
              httpGet: {
                path: '/healthz'
                port: 8080
              }
              periodSeconds: 5
            }
          ]
          volumeMounts: [
            {
              volumeName: 'state'
              mountPath: '/var/lib/acs-relay'
            }
            {
              volumeName: 'config'
              mountPath: '/etc/acs-relay'
            }
          ]
        }
      ]
      scale: {
        minReplicas: replicas
        maxReplicas: replicas
      }
      volumes: [
        {
          name: 'state'
          storageType: 'AzureFile'
          storageName: environmentStorage.name
          // SMB shows every file as 0777 unless told otherwise; keys must be owner-only.
          mountOptions: 'uid=65532,gid=65532,dir_mode=0700,file_mode=0600,nobrl'
        }
        {
          name: 'config'
          storageType: 'Secret'
          secrets: [
            {
              secretRef: 'edge-config'
              path: 'edge-config'
            }
          ]
        }
      ]
    }
  }
}

@description('Where ACS delivers: https://FQDN/api/incomingCall, /api/callbacks/..., wss://FQDN/ws.')
output publicFqdn string = edge.properties.configuration.ingress.fqdn

@description('What agents dial (transport = "tcp").')
output tunnelAddress string = '${edge.properties.configuration.ingress.fqdn}:${tunnelPort}'
