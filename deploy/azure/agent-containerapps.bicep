// A voice bot with the acs-relay agent as a sidecar, in an internal-only Container Apps
// environment: no ingress at all, so nothing can connect to the bot; the agent dials out to the
// edge and forwards each exchange to the bot on localhost.
//
// The agent's identity is a pairing bundle (`relay-edge pair --agent NAME --bundle FILE`) kept
// as a Key Vault secret; the app reads it through a user-assigned managed identity, and the agent
// gets its text in RELAY_AGENT_BUNDLE. No state volume is needed.
//
// The managed identity and its roles come from agent-identity.bicep, deployed first: role
// assignments take minutes to propagate, and a first revision created with them fails.
//
// Redeploys: the agent given SIGTERM has every edge confirm it sends nothing new, then lets calls
// run for drainSeconds; the grace period is 30 s more (Container Apps allows at most 600 s).

@description('Region for every resource.')
param location string = resourceGroup().location

@description('Prefix for resource names.')
param name string = 'voice-bot'

@description('Your bot image; it listens on botPort inside the pod.')
param botImage string

@description('Port the bot listens on (the agent forwards to 127.0.0.1:botPort).')
param botPort int = 8080

@description('The agent image (deploy/docker/build.sh, pushed to your registry).')
param agentImage string

@description('Azure Container Registry (in this resource group) hosting the images.')
param registryName string

@description('Existing Key Vault holding the bundle.')
param keyVaultName string

@description('Name of the Key Vault secret holding the bundle text.')
param bundleSecretName string = 'acs-relay-agent-bundle'

@description('Edge tunnel address (HOST:PORT) from the edge deployment output.')
param edgeAddress string

@description('auto (QUIC, then TCP if UDP gets no answer), quic, or tcp (an edge on Container Apps).')
@allowed([
  'auto'
  'quic'
  'tcp'
])
param transport string = 'auto'

@description('Address space for the environment\'s virtual network.')
param vnetAddressPrefix string = '10.60.0.0/16'

@description('Subnet for the environment (at least /23 for the Consumption plan).')
param subnetPrefix string = '10.60.0.0/23'

@description('The user-assigned identity (resource id) from agent-identity.bicep, whose roles have propagated.')
param identityId string

@description('How long a draining agent lets calls run, in seconds (the grace period is 30 s more; Container Apps allows 600).')
@minValue(30)
@maxValue(570)
param drainSeconds int = 570

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: '${name}-vnet'
  location: location
  properties: {
    addressSpace: {
      addressPrefixes: [
        vnetAddressPrefix
      ]
    }
    subnets: [
      {
        name: 'apps'
        properties: {
          addressPrefix: subnetPrefix
        }
      }
    ]
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

// Internal: the environment gets no public endpoint.
resource environment 'Microsoft.App/managedEnvironments@2024-03-01' = {
  name: '${name}-env'
  location: location
  properties: {
    vnetConfiguration: {
      infrastructureSubnetId: vnet.properties.subnets[0].id
      internal: true
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

resource bot 'Microsoft.App/containerApps@2024-03-01' = {
  name: name
  location: location
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    managedEnvironmentId: environment.id
    configuration: {
      activeRevisionsMode: 'Single'
      // No ingress: the app accepts no connection from anywhere.
      registries: [
        {
          server: registry.properties.loginServer
          identity: identityId
        }
      ]
      secrets: [
        {
          name: 'agent-bundle'
          keyVaultUrl: '${vault.properties.vaultUri}secrets/${bundleSecretName}'
          identity: identityId
        }
      ]
    }
    template: {
      terminationGracePeriodSeconds: drainSeconds + 30
      containers: [
        {
          name: 'bot'
          image: botImage
          resources: {
            cpu: json('1.0')
            memory: '2Gi'
          }
        }
        {
          name: 'acs-relay-agent'
          image: agentImage
          args: [
            'run'
          ]
          env: [
            {
              name: 'RELAY_AGENT_BUNDLE'
              secretRef: 'agent-bundle'
            }
            {
              name: 'RELAY_AGENT_DRAIN_TIMEOUT'
              value: '${drainSeconds}s'
            }
            {
              name: 'RELAY_AGENT_EDGE'
              value: edgeAddress
            }
            {
              name: 'RELAY_AGENT_UPSTREAM'
              value: 'http://127.0.0.1:${botPort}'
            }
            {
              name: 'RELAY_AGENT_TRANSPORT'
              value: transport
            }
            {
              // Probes come from the platform, so the admin listener listens on the replica's address.
              name: 'RELAY_AGENT_ADMIN_LISTEN'
              value: '0.0.0.0:9091'
            }
          ]
          // Sized from relay-bench: about half a core per 200 concurrent calls.
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: 9091
              }
              periodSeconds: 10
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: 9091
              }
              periodSeconds: 5
            }
          ]
        }
      ]
      scale: {
        minReplicas: 1
        maxReplicas: 1
      }
    }
  }
}

@description('The app\'s name.')
output appName string = bot.name
